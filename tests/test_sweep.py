"""The study sweep with real `run_glue_fw.py` runs of a tiny BERT: grid, kill and resume, retries, bad study files;
and several runs per GPU: the slot layout, the memory check, and a sweep that packs a GPU once a run measured its peak
(faked GPUs: `CUDA_VISIBLE_DEVICES`, `torch.cuda.is_available` and the one function that asks GPUs their memory)."""

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
import torch
import yaml
from test_run_glue_fw import glue_dir, tiny_model_dir  # noqa: F401  (module-scoped fixtures)

from fw_trainer.study import slots
from fw_trainer.study.code_revision import code_revision
from fw_trainer.study.config import StudyConfig, StudyConfigError
from fw_trainer.study.slots import SlotLayout, query_gpu_memory
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
    axes = {"method": {"lora": {"method": "lora"}, "broken": {"method": "lora", "lora_alpha": -1}}}
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
    assert log.count("=====") == 2 and "lora_alpha" in log  # one retry, and the script's own error


GIB = 2**30


@pytest.fixture
def fake_gpus(monkeypatch):
    """Makes the sweep see the GPUs `devices` (a `CUDA_VISIBLE_DEVICES` value) with `free_gb` GiB free each; returns
    the list of the GPU lists their memory was asked for."""
    queries = []

    def fake(devices: str, free_gb: float = 10.0) -> list:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", devices)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

        def query_gpu_memory(gpus):
            queries.append(gpus)
            return [(int(free_gb * GIB), 80 * GIB) for _ in gpus]

        monkeypatch.setattr(slots, "query_gpu_memory", query_gpu_memory)
        return queries

    return fake


@pytest.mark.parametrize(
    "devices, parallel, runs_per_gpu, expected_gpus, expected_per_gpu",
    [
        ("3,5", 4, 2, ["3", "5", "3", "5"], 2),
        ("3,5", 3, 2, ["3", "5", "3"], 2),  # round-robin: the second GPU gets one run fewer
        ("0,1,2", 2, 4, ["0", "1"], 1),  # spread over the GPUs, not two on the first
        ("0", 3, 3, ["0", "0", "0"], 3),
    ],
)  # fmt: skip
def test_slots_go_round_robin_over_the_gpus(
    devices, parallel, runs_per_gpu, expected_gpus, expected_per_gpu, fake_gpus
):
    fake_gpus(devices)
    layout = SlotLayout.plan(parallel, runs_per_gpu)
    assert [env["CUDA_VISIBLE_DEVICES"] for env in layout.environments] == expected_gpus
    assert layout.runs_per_gpu == expected_per_gpu
    assert {env["OMP_NUM_THREADS"] for env in layout.environments} == {str(max(1, os.cpu_count() // parallel))}
    # At most one run per GPU opens one slot on each GPU used: the first slots.
    first = layout.environments[: layout.slots(1)]
    assert [env["CUDA_VISIBLE_DEVICES"] for env in first] == sorted(set(expected_gpus), key=expected_gpus.index)


def test_slot_layout_one_gpu_and_cpu(fake_gpus, monkeypatch):
    fake_gpus("7")
    assert SlotLayout.plan(1).environments == [{"CUDA_VISIBLE_DEVICES": "7"}]  # one run keeps PyTorch's threads
    with pytest.raises(StudyConfigError, match="--parallel 3 needs 2 GPUs at 2 run.s. per GPU but 1 are visible"):
        SlotLayout.plan(3, runs_per_gpu=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    layout = SlotLayout.plan(2, runs_per_gpu=3)  # without GPUs the runs share the cores; runs_per_gpu has no say
    assert layout.gpus == [] and layout.environments == [{"OMP_NUM_THREADS": str(max(1, os.cpu_count() // 2))}] * 2


def test_runs_that_do_not_fit_are_refused_before_anything_starts(tmp_path, fake_gpus, capsys):
    queries = fake_gpus("0", free_gb=10.0)
    study = write_study(tmp_path, "unused-model", tmp_path, {"seed": [0, 1, 2]})
    argv = [str(study), "--parallel", "3", "--runs_per_gpu", "3", "--run_memory_gb", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    # 3 × (4 GiB × 1.2 + 1 GiB of CUDA context) = 17.4 GiB > 10 GiB; one (5.8 GiB) fits.
    assert (
        "error: 3 runs per GPU do not fit in GPU memory: GPU 0: 3 run(s) × 5.8 GiB = 17.4 GiB of 10.0 GiB free" in err
    )
    assert "Nothing was launched. Use --runs_per_gpu 1 --parallel 1 (the most that fit)" in err
    assert queries == [["0"]]
    assert not (tmp_path / "out").exists()  # no run directory, no log: nothing started
    assert main(argv + ["--dry_run"]) == 2  # the dry run makes the same check
    assert "do not fit" in capsys.readouterr().err


def test_gpu_memory_that_cannot_be_read_is_refused(tmp_path, monkeypatch, capsys):
    # The real query, in a child process that is given a GPU that does not exist (here, or on a machine with GPUs).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "99")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    study = write_study(tmp_path, "unused-model", tmp_path, {"seed": [0, 1]})
    assert main([str(study), "--parallel", "2", "--runs_per_gpu", "2", "--run_memory_gb", "1"]) == 2
    assert "Cannot read the free memory of GPUs 99" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "finished_peak, extra_argv, expected",
    [
        (None, ["--run_memory_gb", "3"], ["GPU 0: 3 run(s) × 4.6 GiB = 13.8 GiB of 20.0 GiB free (80.0 GiB total): fits", "3.0 GiB from --run_memory_gb"]),
        ((2048, "cuda_max_memory_allocated"), [], ["3 run(s) × 3.4 GiB = 10.2 GiB of 20.0 GiB free", "2.0 GiB as measured by a finished run"]),
        ((2048, "cuda_max_memory_allocated"), ["--run_memory_gb", "1"], ["3 run(s) × 2.2 GiB = 6.6 GiB", "1.0 GiB from --run_memory_gb"]),
        ((2048, "cpu_max_rss"), [], ["Slots: 1 GPU × 1 run per GPU", "one run per GPU until a run has measured its peak"]),
        (None, [], ["Slots: 1 GPU × 1 run per GPU (1 at a time", "then as many as fit, up to 3"]),
    ],
)  # fmt: skip
def test_dry_run_prints_the_slots_and_the_memory_check(
    finished_peak, extra_argv, expected, tmp_path, fake_gpus, capsys
):
    fake_gpus("0", free_gb=20.0)
    study = write_study(tmp_path, "unused-model", tmp_path, {"seed": [0, 1, 2, 3]})
    if finished_peak is not None:
        peak_mb, kind = finished_peak
        metrics = {"train_peak_memory_mb": peak_mb, "train_peak_memory_kind": kind}
        (tmp_path / "out" / "seed0").mkdir(parents=True)
        (tmp_path / "out" / "seed0" / "metrics.json").write_text(json.dumps(metrics))
    assert main([str(study), "--dry_run", "--parallel", "3", "--runs_per_gpu", "3", *extra_argv]) == 0
    out = capsys.readouterr().out
    for line in expected:
        assert line in out
    assert not (tmp_path / "out" / "logs").exists()


# Stands in for `run_glue_fw.py`: records when it ran and with which environment, and reports a GPU peak.
FAKE_RUN = """
import json, os, sys, time
start = time.time()
argv = sys.argv[1:]
output_dir, peak_mb = argv[argv.index("--output_dir") + 1], float(argv[argv.index("--peak_mb") + 1])
time.sleep(2.0)
os.makedirs(output_dir, exist_ok=True)
with open(os.path.join(output_dir, "ran.json"), "w") as f:
    json.dump({"start": start, "end": time.time(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
               "threads": os.environ.get("OMP_NUM_THREADS")}, f)
with open(os.path.join(output_dir, "all_results.json"), "w") as f:
    json.dump({"eval_accuracy": 0.5, "train_peak_memory_mb": peak_mb,
               "train_peak_memory_kind": "cuda_max_memory_allocated"}, f)
"""


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = best = 0
    for _, change in events:
        running += change
        best = max(best, running)
    return best


@pytest.mark.parametrize("peak_mb, fitting", [(1024, 3), (3072, 2), (6144, 1)])
def test_sweep_packs_a_gpu_once_the_first_run_measured_its_memory(peak_mb, fitting, tmp_path, fake_gpus, capsys):
    # 10 GiB free; one run counts as peak × 1.2 + 1 GiB: 2.2 GiB (3 fit), 4.6 GiB (2 fit) or 8.2 GiB (1 fits).
    fake_gpus("0", free_gb=10.0)
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    spec = {"output_dir": str(tmp_path / "out"), "results_dir": str(tmp_path / "results"), "script": str(script),
            "args": {"peak_mb": peak_mb}, "axes": {"seed": [0, 1, 2, 3]}}  # fmt: skip
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    assert main([str(tmp_path / "study.yaml"), "--parallel", "3", "--runs_per_gpu", "3", "--no_aggregate"]) == 0

    ran = [json.loads((tmp_path / "out" / f"seed{seed}" / "ran.json").read_text()) for seed in range(4)]
    assert all(r["gpu"] == "0" and r["threads"] == str(max(1, os.cpu_count() // 3)) for r in ran)
    first, rest = ran[0], ran[1:]
    assert all(r["start"] >= first["end"] for r in rest)  # alone on the GPU until it had measured its peak
    assert most_at_once([(r["start"], r["end"]) for r in rest]) == fitting
    out = capsys.readouterr().out
    assert f"-> 1 GPU × {fitting} run{'s' if fitting > 1 else ''} per GPU" in out
    assert re.search(rf"4 ran, 0 failed: [\d.]+ runs/h on 1 GPU × {fitting} run", out)


@pytest.mark.gpu
def test_query_gpu_memory_on_a_real_gpu():
    gpus = slots.visible_gpus()
    memory = query_gpu_memory(gpus)
    assert len(memory) == len(gpus)
    assert all(0 < free <= total for free, total in memory)
