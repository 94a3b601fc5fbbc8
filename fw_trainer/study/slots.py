"""
Where the sweep's runs go: worker slots on the visible GPUs, several per GPU with `--runs_per_gpu`, or shares of the
CPU cores; and the check that several runs fit in a GPU's memory before they are put on it.

Slots go round-robin over the GPUs (slot `i` → GPU `i % number of GPUs`), so that `--parallel` below GPUs × runs per
GPU spreads the runs over every GPU instead of filling the first ones, and so that "at most `k` runs per GPU" is simply
"the first GPUs × `k` slots" — which is how the sweep holds back slots until a run has measured its memory.
"""

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from ..measurement import CUDA_PEAK_KIND
from .config import StudyConfigError
from .run_metrics import METRICS_FILE


GIB = 2**30
# `run_glue_fw.py` records its peak as `torch.cuda.max_memory_allocated`, which leaves out what the caching allocator
# reserves beyond its allocations and the CUDA context of the process; both are added to an estimate before it is
# compared with a GPU's free memory.
MEMORY_MARGIN = 0.2
CUDA_CONTEXT_GB = 1.0
# Asks for the free and total memory of each visible GPU in a child process (see `query_gpu_memory`).
_MEMORY_PROBE = (
    "import json, torch; print(json.dumps([torch.cuda.mem_get_info(i) for i in range(torch.cuda.device_count())]))"
)


def visible_gpus() -> list[str]:
    """The GPUs the runs may use, as `CUDA_VISIBLE_DEVICES` entries; empty without CUDA."""
    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


@dataclass
class SlotLayout:
    """
    The worker slots of a sweep and the extra environment of each.

    Args:
        gpus (`list[str]`): The GPUs in use (`CUDA_VISIBLE_DEVICES` entries); empty when the runs share the CPU.
        runs_per_gpu (`int`): The most runs one GPU gets.
        environments (`list[dict[str, str]]`): Per slot: its GPU (`CUDA_VISIBLE_DEVICES`, round-robin) and its share
            of the CPU cores (`OMP_NUM_THREADS`).
    """

    gpus: list[str]
    runs_per_gpu: int
    environments: list[dict[str, str]]

    @classmethod
    def plan(cls, parallel: int, runs_per_gpu: int = 1) -> "SlotLayout":
        """
        `parallel` slots: round-robin over the visible GPUs with at most `runs_per_gpu` on each, else (no GPU) an equal
        share of the CPU cores each (`runs_per_gpu` does not apply there).

        Raises:
            `StudyConfigError`: If `parallel` exceeds the visible GPUs × `runs_per_gpu`.
        """
        gpus = visible_gpus()
        threads = str(max(1, (os.cpu_count() or 1) // parallel))
        if not gpus:
            return cls([], 1, [{"OMP_NUM_THREADS": threads} for _ in range(parallel)])
        if parallel > len(gpus) * runs_per_gpu:
            raise StudyConfigError(
                f"--parallel {parallel} needs {math.ceil(parallel / runs_per_gpu)} GPUs at {runs_per_gpu} run(s) per "
                f"GPU but {len(gpus)} are visible: use --parallel {len(gpus) * runs_per_gpu} or fewer, or put more "
                f"runs on each GPU with --runs_per_gpu {math.ceil(parallel / len(gpus))} (memory permitting)."
            )
        gpus = gpus[:parallel]
        environments = [{"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} for slot in range(parallel)]
        if parallel > 1:
            # Each run would otherwise start a thread per core for its CPU-side work, `parallel` times too many
            # threads in all; a single run keeps PyTorch's own default, as before.
            for environment in environments:
                environment["OMP_NUM_THREADS"] = threads
        return cls(gpus, math.ceil(parallel / len(gpus)), environments)

    def slots(self, runs_per_gpu: Optional[int] = None) -> int:
        """How many slots are open with at most `runs_per_gpu` runs on a GPU (all of them by default)."""
        if not self.gpus or runs_per_gpu is None:
            return len(self.environments)
        return min(len(self.environments), len(self.gpus) * runs_per_gpu)

    def runs_on(self, gpu: str, runs_per_gpu: Optional[int] = None) -> int:
        """How many open slots run on `gpu`."""
        return sum(env["CUDA_VISIBLE_DEVICES"] == gpu for env in self.environments[: self.slots(runs_per_gpu)])

    def describe(self, runs_per_gpu: Optional[int] = None) -> str:
        """The layout in words, e.g. `1 GPU × 3 runs per GPU (3 at a time, 5 CPU threads each)`."""
        open_slots = self.slots(runs_per_gpu)
        threads = self.environments[0].get("OMP_NUM_THREADS")
        threads = f", {threads} CPU thread(s) each" if threads else ""
        if not self.gpus:
            return f"the CPU ({open_slots} at a time{threads})"
        per_gpu = min(self.runs_per_gpu, runs_per_gpu or self.runs_per_gpu)
        return (
            f"{len(self.gpus)} GPU{'s' if len(self.gpus) > 1 else ''} × {per_gpu} run{'s' if per_gpu > 1 else ''} "
            f"per GPU ({open_slots} at a time{threads})"
        )


def query_gpu_memory(gpus: list[str]) -> list[tuple[int, int]]:
    """
    The free and total memory, in bytes, of each of `gpus` as the runs will see them.

    Asked in a child process with the runs' `CUDA_VISIBLE_DEVICES`, not with `nvidia-smi`: nvidia-smi numbers GPUs in
    PCI order (CUDA's default order can differ) and reports a MIG slice's parent GPU, whereas CUDA resolves indices,
    UUIDs and MIG instances exactly as the runs will. Not in this process either: `torch.cuda.mem_get_info` creates a
    CUDA context on each GPU (about half a GiB), which the sweep would hold for its whole life, taken from its runs.

    Raises:
        `StudyConfigError`: If the GPUs cannot be queried.
    """
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    try:
        probe = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE], env=environment, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        probe = None
    try:
        memory = json.loads(probe.stdout) if probe is not None and probe.returncode == 0 else None
    except ValueError:
        memory = None
    if not isinstance(memory, list) or len(memory) != len(gpus):
        if probe is None:
            reason = "no answer in 300 s"
        elif isinstance(memory, list):
            reason = f"a process given them sees {len(memory)} GPU(s)"
        else:
            reason = probe.stderr.strip()[-500:] or probe.stdout.strip()
        raise StudyConfigError(
            f"Cannot read the free memory of GPUs {','.join(gpus)}, which putting several runs on one GPU needs: "
            f"{reason}. Use --runs_per_gpu 1 to run one per GPU without the check."
        )
    return [(int(free), int(total)) for free, total in memory]


def measured_peak_gb(run_dirs: list[str]) -> Optional[float]:
    """The largest GPU peak memory, in GiB, that the finished runs in `run_dirs` measured (from their
    `metrics.json`); `None` when none of them trained on a GPU."""
    peaks = []
    for directory in run_dirs:
        try:
            with open(os.path.join(directory, METRICS_FILE), encoding="utf-8") as f:
                metrics = json.load(f)
        except (OSError, ValueError):
            continue
        if metrics.get("train_peak_memory_kind") == CUDA_PEAK_KIND and metrics.get("train_peak_memory_mb"):
            peaks.append(metrics["train_peak_memory_mb"] / 1024)
    return max(peaks, default=None)


def run_footprint_gb(run_memory_gb: float) -> float:
    """What one run is counted as taking on its GPU: its estimate, plus the margin, plus its CUDA context."""
    return run_memory_gb * (1 + MEMORY_MARGIN) + CUDA_CONTEXT_GB


def fitting_runs_per_gpu(
    layout: SlotLayout, memory: list[tuple[int, int]], run_memory_gb: float, source: str
) -> tuple[int, list[str]]:
    """
    Checks the layout's runs per GPU against each GPU's free memory.

    Args:
        layout (`SlotLayout`): The slots; `layout.gpus[i]` has `memory[i]`.
        memory (`list[tuple[int, int]]`): Free and total bytes per GPU (from [`query_gpu_memory`]).
        run_memory_gb (`float`): The estimate of one run's peak memory.
        source (`str`): Where the estimate comes from, for the report.

    Returns:
        `tuple[int, list[str]]`: The most runs per GPU, up to `layout.runs_per_gpu`, that fit on every GPU (0 when not
        even one does), and a line per GPU saying what was compared, then one saying how a run was counted.
    """
    footprint = run_footprint_gb(run_memory_gb)
    free_gb = [free / GIB for free, _ in memory]
    # The largest k whose first GPUs × k slots fit everywhere (the last GPUs may get one run fewer than the first).
    fitting = next(
        k
        for k in range(layout.runs_per_gpu, -1, -1)
        if all(layout.runs_on(gpu, k) * footprint <= free for gpu, free in zip(layout.gpus, free_gb))
    )
    lines = []
    for gpu, free, (_, total) in zip(layout.gpus, free_gb, memory):
        runs = layout.runs_on(gpu)
        lines.append(
            f"GPU {gpu}: {runs} run(s) × {footprint:.1f} GiB = {runs * footprint:.1f} GiB of {free:.1f} GiB free "
            f"({total / GIB:.1f} GiB total): {'fits' if runs * footprint <= free else 'does NOT fit'}"
        )
    lines.append(
        f"(one run: {run_memory_gb:.1f} GiB {source}, + {MEMORY_MARGIN:.0%} + {CUDA_CONTEXT_GB:g} GiB CUDA context)"
    )
    return fitting, lines


def plan_runs_per_gpu(
    layout: SlotLayout, finished_run_dirs: list[str], run_memory_gb: Optional[float] = None
) -> tuple[Optional[list[tuple[int, int]]], int, list[str]]:
    """
    Checks, before anything is launched, that the layout's runs fit in its GPUs' memory.

    One run per GPU needs no check (as before there were several). Otherwise one run's memory is `run_memory_gb` or
    else the largest peak the study's finished GPU runs measured; with neither, the sweep starts one run per GPU and
    decides once the first run has reported its peak (see [`fitting_runs_per_gpu`]).

    Args:
        layout (`SlotLayout`): The slots.
        finished_run_dirs (`list[str]`): The output directories of the study's runs, to read measured peaks from.
        run_memory_gb (`float`, *optional*): The user's estimate of one run's peak GPU memory, in GiB.

    Returns:
        `tuple`: The free and total memory of each GPU now (`None` when not checked), the runs per GPU to start with,
        and lines saying what was checked.

    Raises:
        `StudyConfigError`: If the runs per GPU asked for do not fit by the estimate: nothing should be launched.
    """
    if not layout.gpus or layout.runs_per_gpu == 1:
        return None, layout.runs_per_gpu, []
    memory = query_gpu_memory(layout.gpus)
    source = "from --run_memory_gb"
    if run_memory_gb is None:
        run_memory_gb, source = measured_peak_gb(finished_run_dirs), "as measured by a finished run of this study"
    if run_memory_gb is None:
        return (
            memory,
            1,
            [
                "No estimate of one run's GPU memory yet (no --run_memory_gb, no finished run on a GPU): one run per "
                f"GPU until a run has measured its peak, then as many as fit, up to {layout.runs_per_gpu}."
            ],
        )
    fitting, lines = fitting_runs_per_gpu(layout, memory, run_memory_gb, source)
    if fitting < layout.runs_per_gpu:
        parallel = min(len(layout.environments), len(layout.gpus) * fitting)
        what_to_do = (
            f"Use --runs_per_gpu {fitting} --parallel {parallel} (the most that fit)"
            if fitting
            else "Not even one run per GPU fits by this estimate: free memory on the GPUs"
        )
        raise StudyConfigError(
            f"{layout.runs_per_gpu} runs per GPU do not fit in GPU memory: "
            + "; ".join(line for line in lines[:-1] if not line.endswith(": fits"))
            + f" {lines[-1]}. Nothing was launched. {what_to_do}, or pass --run_memory_gb with one run's measured "
            "peak in GiB (a finished run's `train_peak_memory_mb` / 1024) if the estimate is wrong."
        )
    return memory, layout.runs_per_gpu, lines
