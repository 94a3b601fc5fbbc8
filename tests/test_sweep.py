"""The study sweep with real `run_glue_fw.py` runs of a tiny BERT: grid, kill and resume, retries, bad study files."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_run_glue_fw import glue_dir, tiny_model_dir  # noqa: F401  (module-scoped fixtures)

from fw_trainer.study.config import StudyConfig, StudyConfigError
from fw_trainer.study.sweep import log_path, main, run_command


REPO = Path(__file__).resolve().parents[1]


def write_study(tmp_path, model_dir, glue, axes, **extra) -> Path:
    spec = {
        "output_dir": str(tmp_path / "out"),
        "results_dir": str(tmp_path / "results"),
        "args": {
            "model_name_or_path": model_dir,
            "glue_dir": str(glue),
            "task_name": "sst2",
            "do_train": True,
            "do_eval": True,
            "per_device_train_batch_size": 16,
            "learning_rate": 5e-3,
            "max_steps": 12,
            "logging_steps": 4,
            "eval_strategy": "steps",
            "eval_steps": 6,
            "lora_r": 4,
            "fw_warmup_steps": 4,
            "use_cpu": True,
            "report_to": "none",
            "disable_tqdm": True,
        },  # fmt: skip
        "axes": axes,
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


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


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"results_dir": "r", "axes": {"seed": [0]}}, "has no `output_dir`"),
        ({"output_dir": "o", "results_dir": "r", "axes": {"seed": []}}, "non-empty list"),
        ({"output_dir": "o", "results_dir": "r", "axes": {"m": {"a": 1}}}, "should be a mapping of arguments"),
        ({"output_dir": "o", "results_dir": "r", "axes": {"seed": [0]}, "args": {"output_dir": "x"}}, "set per run"),
        ({"output_dir": "o", "results_dir": "r", "axes": {"seed": [0]}, "typo": 1}, "unknown key"),
        (
            {"output_dir": "o", "results_dir": "r", "axes": {"m": {"a": {}}}, "comparisons": {"axis": "m", "pairs": [["a", "b"]]}},
            "should name two of",
        ),
    ],
)  # fmt: skip
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


def test_failing_run_is_retried_and_reported(tmp_path, tiny_model_dir, glue_dir, capsys):  # noqa: F811
    axes = {"method": {"lora": {"method": "lora"}, "broken": {"method": "lora", "lora_alpha": -1}}}
    study = write_study(tmp_path, tiny_model_dir, glue_dir, axes)
    config = StudyConfig.from_yaml(str(study))
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert main([str(study), "--no_aggregate"]) == 1
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert "1 run(s) failed: broken" in err
    good, broken = config.runs()
    assert (tmp_path / "out" / good.name / "metrics.json").is_file()
    with open(log_path(config, broken)) as f:
        log = f.read()
    assert log.count("=====") == 2 and "lora_alpha" in log  # one retry, and the script's own error
