"""Several study runs per GPU: the slot layout, the memory check, and a sweep that packs a GPU once a run measured its
peak (faked GPUs: `CUDA_VISIBLE_DEVICES`, `torch.cuda.is_available` and the one function that asks GPUs their
memory)."""

import json
import os
import re

import pytest
import torch
from study_specs import write_script_study, write_study

from fw_trainer.study import slots
from fw_trainer.study.config import StudyConfigError
from fw_trainer.study.slots import SlotLayout, query_gpu_memory
from fw_trainer.study.sweep import main


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
)
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
        (
            None,
            ["--run_memory_gb", "3"],
            [
                "GPU 0: 3 run(s) × 4.6 GiB = 13.8 GiB of 20.0 GiB free (80.0 GiB total): fits",
                "3.0 GiB from --run_memory_gb",
            ],
        ),
        (
            (2048, "cuda_max_memory_allocated"),
            [],
            ["3 run(s) × 3.4 GiB = 10.2 GiB of 20.0 GiB free", "2.0 GiB as measured by a finished run"],
        ),
        (
            (2048, "cuda_max_memory_allocated"),
            ["--run_memory_gb", "1"],
            ["3 run(s) × 2.2 GiB = 6.6 GiB", "1.0 GiB from --run_memory_gb"],
        ),
        (
            (2048, "cpu_max_rss"),
            [],
            ["Slots: 1 GPU × 1 run per GPU", "one run per GPU until a run has measured its peak"],
        ),
        (None, [], ["Slots: 1 GPU × 1 run per GPU (1 at a time", "then as many as fit, up to 3"]),
    ],
)
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
from fw_trainer.glue.completion import write_completion
write_completion(output_dir, ["train", "eval"])
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
    write_script_study(tmp_path, FAKE_RUN, {"peak_mb": peak_mb}, [0, 1, 2, 3])
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
