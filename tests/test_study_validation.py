"""What a sweep refuses before its first run, in one `error:` paragraph with nothing run: run arguments the GLUE script
would reject (the whole grid is parsed up front), an axis that repeats a value, and a study that another sweep is
running."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from study_specs import write_script_study, write_study

from fw_trainer.study import slots, validation
from fw_trainer.study.config import StudyConfig, StudyConfigError
from fw_trainer.study.sweep import log_path, main


REPO = Path(__file__).resolve().parents[1]
# What a user finds in the study's output directory while a sweep runs it.
SWEEP_LOCK_FILE = "fw_sweep.lock"

# Stands in for `run_glue_fw.py` where the arguments are not the point: holds its output directory as the script does
# (`fw_run.lock`) for `--sleep` seconds, then leaves a finished run.
FAKE_RUN = """
import json, os, sys, time
from fw_trainer.glue.completion import write_completion
from fw_trainer.glue.run_directory import OutputDirectoryLock
argv = sys.argv[1:]
output_dir = argv[argv.index("--output_dir") + 1]
with OutputDirectoryLock(output_dir):
    time.sleep(float(argv[argv.index("--sleep") + 1]))
    with open(os.path.join(output_dir, "all_results.json"), "w") as f:
        json.dump({"eval_accuracy": 0.5}, f)
    write_completion(output_dir, ["train", "eval"])
"""


def error_paragraph(err: str) -> str:
    """The one `error:` paragraph `err` ends with (the test fails if there are several, or other lines after it)."""
    assert err.count("error:") == 1, err
    paragraph = err[err.index("error:") :].strip()
    assert "\n" not in paragraph, paragraph
    return paragraph


def fake_study(tmp_path: Path, sleep: float, seeds=(0, 1)) -> Path:
    return write_script_study(tmp_path, FAKE_RUN, {"sleep": sleep}, seeds)


@pytest.mark.parametrize(
    "axes, refused, message",
    [
        (  # a misspelt method, on the last variant: found before the first run, not after it
            {"method": {"lora": {"method": "lora"}, "typo": {"method": "fw_lorra"}}, "seed": [0, 1]},
            "typo/seed0, typo/seed1: Argument --method: invalid choice: 'fw_lorra'",
            "refuses the arguments of 2 of the study's 4 runs",
        ),
        (  # an option the script does not have
            {"method": {"lora": {"method": "lora"}, "fw": {"method": "fw_lora", "fw_lamda": 0.1}}},
            "fw: Unknown arguments: --fw_lamda 0.1",
            "refuses the arguments of 1 of the study's 2 runs",
        ),
        (  # a value the script's own checks reject
            {"seed": [0, -1]},
            "seed-1: --seed should be an integer in [0, 2**32), but the value passed is -1.",
            "refuses the arguments of 1 of the study's 2 runs",
        ),
    ],
)
def test_run_arguments_the_script_would_refuse_stop_the_sweep_before_any_run(
    axes, refused, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(REPO)
    study = write_study(tmp_path, str(tmp_path / "no_model"), tmp_path, axes)
    assert main([str(study), "--no_aggregate"]) == 2
    out, err = capsys.readouterr()
    error = error_paragraph(err)
    assert error.startswith(f"error: {study}: the GLUE script (run_glue_fw.py) {message}, so none was started.")
    assert refused in error and error.endswith("Fix the study file (or its base_config) and run the sweep again.")
    assert not (tmp_path / "out").exists()  # nothing run, nothing written
    # The dry run lists every run, then reports the same refusal.
    assert main([str(study), "--dry_run"]) == 2
    out, err = capsys.readouterr()
    assert out.count("[to run]") == len(StudyConfig.from_yaml(str(study)).runs())
    assert refused in error_paragraph(err)
    assert not (tmp_path / "out").exists()


def test_argument_errors_leave_the_environment_as_it_was(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    before = dict(os.environ)
    ok = ["--task_name", "sst2", "--use_cpu", "true", "--output_dir", "x", "--report_to", "none"]
    errors = validation.argument_errors([ok, [*ok, "--method", "fw_lorra"], [*ok, "--help"]])
    assert errors[0] is None and "invalid choice: 'fw_lorra'" in errors[1] and "--help" in errors[2]
    assert dict(os.environ) == before


def test_a_study_with_a_script_of_its_own_is_not_parsed_as_the_glue_script(tmp_path, capsys):
    # `--sleep` is no argument of the GLUE script: the study's script takes its own.
    assert main([str(fake_study(tmp_path, 0.0)), "--dry_run"]) == 0
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, message",
    [
        ("axes:\n  seed: [0, 0, 1]\n", "axis 'seed' has the value 0 twice in [0, 0, 1]"),
        ("axes:\n  learning_rate: [0.001, 1.0e-3]\n", "axis 'learning_rate' has the value 0.001 twice"),
        ("axes:\n  lora_r: [8, '8']\n", "axis 'lora_r' has the value '8' twice (8 and '8' are the same value)"),
        (
            "axes:\n  method:\n    lora: {method: lora}\n    lora: {method: fw_lora}\n",
            "the key 'lora' is given twice in one mapping (lines 5 and 6)",
        ),
        (
            "axes:\n  seed:\n    seed0: {seed: 0}\n    0: {seed: 1}\n",
            "labels 'seed0' and '0' of axis 'seed' both name the run directory 'seed0'",
        ),
    ],
)
def test_an_axis_that_repeats_a_value_is_refused(text, message, tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\nresults_dir: {tmp_path / 'results'}\n{text}")
    with pytest.raises(StudyConfigError) as refused:
        StudyConfig.from_yaml(str(path))
    assert message in str(refused.value)
    assert main([str(path)]) == 2
    assert message in error_paragraph(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_second_sweep_of_a_study_is_refused_while_the_first_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    study = fake_study(tmp_path, sleep=15.0, seeds=(0,))
    config = StudyConfig.from_yaml(str(study))
    first = subprocess.Popen(
        [sys.executable, "-m", "fw_trainer.study.sweep", str(study), "--no_aggregate"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run_lock = tmp_path / "out" / "seed0" / "fw_run.lock"
        start = time.time()
        while not run_lock.is_file():  # the first sweep's first run is under way
            assert first.poll() is None and time.time() - start < 120, first.communicate()
            time.sleep(0.1)
        # Without retries: a retry could come after the first sweep's run has ended, and pass.
        assert main([str(study), "--no_aggregate", "--max_retries", "0"]) == 2
        error = error_paragraph(capsys.readouterr().err)
        assert f"Another sweep is running this study in {tmp_path / 'out'} (process {first.pid} on " in error
        assert f" on {socket.gethostname()}, started 20" in error and "Nothing was run." in error
        assert f"Wait for it to end, or stop it (Ctrl-C in its terminal, or `kill {first.pid}`" in error
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert "1 ran, 0 failed" in out
    (run,) = config.runs()
    assert Path(log_path(config, run)).read_text().count("=====") == 1  # started once: by the first sweep
    assert not (tmp_path / "out" / SWEEP_LOCK_FILE).exists()  # released when the sweep ended


def test_a_study_held_by_a_sweep_on_another_host_is_refused_before_the_memory_check(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    study = fake_study(tmp_path, sleep=0.0, seeds=(0, 1))
    lock = tmp_path / "out" / SWEEP_LOCK_FILE
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": 4242, "host": "elsewhere.example", "started": "2024-01-01T00:00:00"}))
    # Two runs on a GPU with 1 GiB free: the memory check would refuse them, but the other sweep comes first (its
    # runs would be what fills the GPU).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(slots, "query_gpu_memory", lambda gpus: [(2**30, 80 * 2**30) for _ in gpus])
    assert main([str(study), "--parallel", "2", "--runs_per_gpu", "2", "--run_memory_gb", "4"]) == 2
    error = error_paragraph(capsys.readouterr().err)
    assert "Another sweep is running this study" in error and "do not fit" not in error
    assert "(process 4242 on elsewhere.example, started 2024-01-01T00:00:00)" in error
    assert f"if it has ended already, remove {lock}." in error
    assert sorted(os.listdir(tmp_path / "out")) == [SWEEP_LOCK_FILE]  # nothing run, the lock left as it was


def test_the_study_lock_of_a_dead_sweep_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    study = fake_study(tmp_path, sleep=0.0, seeds=(0,))
    lock = tmp_path / "out" / SWEEP_LOCK_FILE
    lock.parent.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(), "started": "earlier"}))
    assert main([str(study), "--no_aggregate"]) == 0  # a killed sweep's lock
    assert (tmp_path / "out" / "seed0" / "metrics.json").is_file() and not lock.exists()


def test_a_study_output_directory_that_cannot_be_created_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    study = fake_study(tmp_path, sleep=0.0, seeds=(0,))
    (tmp_path / "a_file").write_text("")
    spec = yaml.safe_load(study.read_text())
    study.write_text(yaml.safe_dump({**spec, "output_dir": str(tmp_path / "a_file" / "out")}))
    assert main([str(study), "--no_aggregate"]) == 2
    error = error_paragraph(capsys.readouterr().err)
    assert f"The study's output directory {tmp_path / 'a_file' / 'out'} cannot be created" in error
    assert error.endswith("Nothing was run. Set another `output_dir` in the study file.")
