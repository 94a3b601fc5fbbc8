"""The artefact checks of `scripts/gpu_check.py` (`make gpu-check`) on CPU runs of a tiny model: they pass on a good
run and name what is wrong with a broken one, so that the GPU check cannot pass by checking nothing."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_glue_runs import common, glue_dir, run, tiny_model_dir  # noqa: F401 (fixtures)


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


@pytest.fixture
def finished_runs(tiny_model_dir, glue_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("GLUE_DIR", str(glue_dir))
    runs = {}
    for method in ("fw_lora", "full"):
        runs[method] = tmp_path / method
        args = common(tiny_model_dir, runs[method], "--task_name", "sst2", "--method", method)
        assert run([*args, "--report_to", "tensorboard"]) == 0
    return runs


def test_good_runs_pass(finished_runs):
    for method, output_dir in finished_runs.items():
        assert gpu_check.check_run(output_dir, method, min_accuracy=None, device="cpu") == []


def test_broken_runs_are_named(finished_runs):
    fw_lora = finished_runs["fw_lora"]
    # A run on the GPU must report CUDA's peak memory; one that learned nothing is caught by the accuracy floor.
    failures = gpu_check.check_run(fw_lora, "fw_lora", min_accuracy=1.01, device="cuda")
    assert any("below 1.01" in failure for failure in failures)
    assert any("expected a positive cuda_max_memory_allocated" in failure for failure in failures)

    os.remove(fw_lora / "fw_importance.json")
    shutil.rmtree(fw_lora / "runs")
    os.remove(fw_lora / "adapter_model.safetensors")
    failures = gpu_check.check_run(fw_lora, "fw_lora", min_accuracy=None, device="cpu")
    assert failures[0] == "no fw_importance.json"
    assert failures[1].startswith("the saved model does not reload")
    assert failures[2] == "no TensorBoard event file"


@pytest.mark.slow
def test_gpu_check_script_on_the_cpu(tmp_path):
    """The script itself, end to end on the real MiniLM and SST-2, on the CPU (a smoke test: a few steps per run)."""
    if not os.environ.get("GLUE_DIR"):
        pytest.skip("needs GLUE_DIR")
    command = [sys.executable, "scripts/gpu_check.py", "--use_cpu", "--skip_tests", "--skip_benchmark"]
    command += ["--runs", "lora", "fw_lora_sketch", "--max_steps", "6", "--warmup_steps", "3", "--accuracy_floor", "0"]
    command += ["--output_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.splitlines()[-1] == "all 2 checks passed"
