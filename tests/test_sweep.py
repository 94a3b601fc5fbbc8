"""The study sweep with real `run_glue_fw.py` runs of a tiny BERT: grid, kill and resume, retries, bad study files
(several runs per GPU: test_sweep_slots.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from study_specs import write_study
from tiny_glue_runs import glue_dir, tiny_model_dir  # noqa: F401  (module-scoped fixtures)

from fw_trainer.study.code_revision import code_revision
from fw_trainer.study.config import StudyConfig, StudyConfigError
from fw_trainer.study.sweep import log_path, main, run_command


REPO = Path(__file__).resolve().parents[1]


def wait_for(condition, timeout=120):
    start = time.time()
    while not condition():
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.2)


def test_grid_expansion_and_run_names(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": "o",
                "results_dir": "r",
                "args": {"lora_r": 8, "learning_rate": 1e-3},
                "axes": {
                    "task": {"sst2": {"task_name": "sst2"}, "cola": {"task_name": "cola", "learning_rate": 2e-3}},
                    "lora_alpha": [8, 16],
                    "seed": [0, 1],
                },
            },
            sort_keys=False,
        )
    )
    runs = StudyConfig.from_yaml(str(path)).runs()
    assert [r.name for r in runs][:3] == [
        "sst2/lora_alpha8/seed0",
        "sst2/lora_alpha8/seed1",
        "sst2/lora_alpha16/seed0",
    ]
    assert len(runs) == 8
    cola = runs[-1]
    assert cola.args == {"lora_r": 8, "learning_rate": 2e-3, "task_name": "cola", "lora_alpha": 16, "seed": 1}
    assert cola.group == (("task", "cola"), ("lora_alpha", "16"))


def test_a_reference_takes_the_value_of_the_runs_own_argument(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": "o",
                "results_dir": "r",
                "axes": {
                    "method": {
                        "fisher_max": {"method": "fw_lora", "fw_normalization": "max"},
                        "shuffled_max": {"method": "fw_lora", "fw_normalization": "max", "fw_shuffle_seed": "${seed}"},
                    },
                    "seed": [5, 6],
                },
            }
        )
    )
    runs = {run.name: run.args for run in StudyConfig.from_yaml(str(path)).runs()}
    assert runs["shuffled_max/seed5"]["fw_shuffle_seed"] == 5
    assert runs["shuffled_max/seed6"]["fw_shuffle_seed"] == 6
    assert "fw_shuffle_seed" not in runs["fisher_max/seed5"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"results_dir": "r", "axes": {"seed": [0]}}, "has no `output_dir`"),
        (
            {"output_dir": "o", "results_dir": "r", "axes": {"seed": [0]}, "args": {"fw_shuffle_seed": "${sed}"}},
            "refers to `sed`, which is not an argument the study file gives this run",
        ),
        (
            {"output_dir": "o", "results_dir": "r", "axes": {"seed": [0]}, "args": {"a": "${b}", "b": "${seed}"}},
            "refers to `b`, which is itself a reference",
        ),
        ({"output_dir": "o", "results_dir": "r", "axes": {"seed": []}}, "non-empty list"),
        ({"output_dir": "o", "results_dir": "r", "axes": {"m": {"a": 1}}}, "should be a mapping of arguments"),
        ({"output_dir": "o", "results_dir": "r", "axes": {"seed": [0]}, "args": {"output_dir": "x"}}, "set per run"),
        ({"output_dir": "o", "results_dir": "r", "axes": {"seed": [0]}, "typo": 1}, "unknown key"),
        (
            {
                "output_dir": "o",
                "results_dir": "r",
                "axes": {"m": {"a": {}}},
                "comparisons": {"axis": "m", "pairs": [["a", "b"]]},
            },
            "should name two of",
        ),
    ],
)
def test_bad_study_files(spec, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(StudyConfigError, match=message):
        StudyConfig.from_yaml(str(path))
    assert main([str(path)]) == 2
    assert message in capsys.readouterr().err


def test_run_command_resumes_or_restarts(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), "results_dir": "r", "axes": {"seed": [0]}}))
    config = StudyConfig.from_yaml(str(path))
    (run,) = config.runs()
    assert "--overwrite_output_dir" not in run_command(config, run)  # nothing there yet
    run_dir = tmp_path / "o" / "seed0"
    (run_dir / "runs").mkdir(parents=True)  # a crash before the first checkpoint
    assert run_command(config, run)[-2:] == ["--overwrite_output_dir", "true"]
    (run_dir / "checkpoint-4").mkdir()
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):  # the training state a resume needs
        (run_dir / "checkpoint-4" / name).write_bytes(b"")
    (run_dir / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert "--overwrite_output_dir" not in run_command(config, run)  # resumes from checkpoint-4


def test_killed_sweep_resumes_without_recomputing(tmp_path, tiny_model_dir, glue_dir):  # noqa: F811
    axes = {"method": {"lora": {"method": "lora"}, "fw": {"method": "fw_lora"}}, "seed": [0]}
    study = write_study(
        tmp_path, tiny_model_dir, glue_dir, axes, comparisons={"axis": "method", "pairs": [["fw", "lora"]]}
    )
    config = StudyConfig.from_yaml(str(study))
    first, second = config.runs()
    first_metrics = tmp_path / "out" / first.name / "metrics.json"

    sweep = subprocess.Popen(
        [sys.executable, "-m", "fw_trainer.study.sweep", str(study)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    wait_for(first_metrics.is_file)
    wait_for(lambda: os.path.isfile(log_path(config, second)))
    time.sleep(1.0)
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=60) == 130
    assert "start fw/seed0" in sweep.stdout.read()
    assert not (tmp_path / "out" / second.name / "metrics.json").exists()
    finished = first_metrics.read_bytes(), first_metrics.stat().st_mtime_ns
    log_size = os.path.getsize(log_path(config, second))
    time.sleep(2.0)
    assert os.path.getsize(log_path(config, second)) == log_size  # the run in flight was stopped too

    result = subprocess.run(
        [sys.executable, "-m", "fw_trainer.study.sweep", str(study)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "2 runs, 1 already finished, 1 to run" in result.stdout
    assert (first_metrics.read_bytes(), first_metrics.stat().st_mtime_ns) == finished  # not recomputed
    with open(log_path(config, first)) as f:
        assert f.read().count("=====") == 1
    with open(log_path(config, second)) as f:
        assert f.read().count("=====") == 2  # the interrupted attempt's log is kept
    assert (tmp_path / "out" / second.name / "metrics.json").is_file()
    assert (tmp_path / "results" / "significance_tests.json").is_file()  # aggregated at the end
    # Every result says which code it ran on: the checkout's commit, as git reports it.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if head:
        code = json.loads(first_metrics.read_text())["code"]
        assert code["commit"] == head and isinstance(code["dirty"], bool)
        with open(log_path(config, second)) as f:
            assert f.read().count(f"'commit': '{head}'") == 2


def test_code_revision_of_a_checkout_and_of_an_installed_package(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "tracked.py").write_text("x = 1\n")
    git("add", "tracked.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "run.log").write_text("untracked run output\n")
    assert code_revision(str(tmp_path)) == {"commit": head, "dirty": False}  # run outputs do not make it dirty
    (tmp_path / "tracked.py").write_text("x = 2\n")
    assert code_revision(str(tmp_path)) == {"commit": head, "dirty": True}
    outside = tmp_path.parent / f"{tmp_path.name}_not_a_checkout"
    outside.mkdir()
    assert code_revision(str(outside)) == {"fw-lora": version("fw-lora")}


def test_failing_run_is_retried_and_reported(tmp_path, tiny_model_dir, glue_dir, capsys):  # noqa: F811
    # Arguments that parse (the sweep refuses those that do not before any run: test_study_validation.py) but a run
    # that fails: its model does not exist.
    missing_model = str(tmp_path / "no_such_model")
    axes = {"method": {"lora": {"method": "lora"}, "broken": {"method": "lora", "model_name_or_path": missing_model}}}
    study = write_study(tmp_path, tiny_model_dir, glue_dir, axes)
    config = StudyConfig.from_yaml(str(study))
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert main([str(study), "--no_aggregate"]) == 1
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    assert "1 run(s) failed: broken" in err
    assert re.search(r"\(\d+\.\d\d h\): 1 ran, 1 failed: \d+\.\d runs/h on the CPU \(1 at a time", out)
    good, broken = config.runs()
    assert (tmp_path / "out" / good.name / "metrics.json").is_file()
    with open(log_path(config, broken)) as f:
        log = f.read()
    assert log.count("=====") == 2 and f"{missing_model} does not exist" in log  # one retry, and the script's error
