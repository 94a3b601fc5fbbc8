"""
What a training step or run costs, measured the same way by the trainer's logs, the GLUE script, the benchmarks and the
tests: what `torch.compile` did (graphs, graph breaks, recompilations), the operators and kernels a step launches, and
the peak memory of the device the run trains on.
"""

import os
import re
import resource
from collections import Counter

import torch


# ----- torch.compile ----------------------------------------------------------------------------------------------


def compile_stats() -> dict[str, int]:
    """
    Counts from TorchDynamo since the process started (or since [`reset_compile_stats`]), for everything compiled in
    the process:

    - `graphs`: FX graphs compiled (a frame split by graph breaks gives several);
    - `graph_breaks`: what dynamo could not trace, each time it met it: graph breaks (a graph split in two, the code
      between run eagerly) and unsupported code that made it skip a frame or an inlined call (also run eagerly);
    - `recompiles`: compilations of a frame that was compiled before, because a guard failed (a new input shape, say).

    A training step that compiles into one graph and then reuses it shows `graphs` fixed, and `graph_breaks` and
    `recompiles` at zero, from the second step on. [`FWLoraTrainer`] logs them as `compile/*` with `--torch_compile`.
    """
    from torch._dynamo.utils import counters, get_compilation_metrics

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values()) + sum(counters["unimplemented"].values())),
        "recompiles": sum(metrics.recompile_reason is not None for metrics in get_compilation_metrics()),
    }


def reset_compile_stats() -> None:
    """Starts [`compile_stats`] from zero again (what was compiled stays compiled: see `torch.compiler.reset()`)."""
    from torch._dynamo.utils import clear_compilation_metrics, counters

    counters.clear()
    clear_compilation_metrics()


# ----- operators and kernels --------------------------------------------------------------------------------------

# Operators that only make a new view or read metadata: no kernel.
VIEW_OPS = frozenset(
    "aten::" + name
    for name in (
        "view alias as_strided reshape _reshape_alias detach detach_ select slice t transpose permute unbind expand "
        "unsqueeze squeeze view_as split chunk narrow lift_fresh resolve_conj resolve_neg empty empty_like "
        "empty_strided"
    ).split()
)
# Operators that launch a kernel only when they copy (which shows as a child operator).
COPY_IF_NEEDED_OPS = frozenset({"aten::to", "aten::contiguous", "aten::type_as", "aten::reshape"})
# Inductor's CPU kernels as the profiler records them with `torch._inductor.config.cpp.enable_kernel_profile`:
# `graph_<id>_cpp_fused_...`.
_INDUCTOR_CPU_KERNEL = re.compile(r"^(graph_\d+_)?cpp_")


def launched_operators(profile: torch.profiler.profile) -> Counter:
    """
    The outermost `aten::` operators of a profile that launch at least one kernel, by name: the CPU-side proxy of a GPU
    step's kernel launches (on a GPU each of them is at least one launch). An operator's own sub-calls, views and
    no-op conversions are not counted.
    """
    counts = Counter()
    for event in profile.events():
        if not event.name.startswith("aten::") or event.name in VIEW_OPS - COPY_IF_NEEDED_OPS:
            continue
        if event.cpu_parent is not None and event.cpu_parent.name.startswith("aten::"):
            continue  # a sub-call of an operator already counted
        if event.name in COPY_IF_NEEDED_OPS and all(child.name in VIEW_OPS for child in event.cpu_children):
            continue  # no copy: a no-op or a view
        counts[event.name] += 1
    return counts


def _is_cuda_kernel(event) -> bool:
    if event.device_type != torch.autograd.DeviceType.CUDA:
        return False
    # kineto's activity: "kernel", "gpu_memcpy", "gpu_memset" (older torch has none: tell copies by their name).
    activity = getattr(event, "activity_type", None)
    return activity == "kernel" if activity else not event.name.startswith(("Memcpy", "Memset"))


def count_kernels(profile: torch.profiler.profile, device_type: str) -> int:
    """
    The kernels a profile saw. On CUDA: the CUDA kernels executed (copies and memsets not counted; profile with the
    CUDA activity). On the CPU, where nothing is launched: the [`launched_operators`] plus the C++ kernels inductor
    generated (recorded when `torch._inductor.config.cpp.enable_kernel_profile` is set).
    """
    if device_type == "cuda":
        return sum(1 for event in profile.events() if _is_cuda_kernel(event))
    inductor_kernels = sum(1 for event in profile.events() if _INDUCTOR_CPU_KERNEL.match(event.name))
    return sum(launched_operators(profile).values()) + inductor_kernels


# ----- peak memory ------------------------------------------------------------------------------------------------

CUDA_PEAK_KIND = "cuda_max_memory_allocated"
CPU_PEAK_KIND = "cpu_max_rss"


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak-memory measurement on `device`: CUDA's peak allocation counter, or on Linux the process's
    peak resident set size (`VmHWM`, reset through `/proc/self/clear_refs`)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then counts from the process's start


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """
    Peak memory of the device a run trains on since [`reset_peak_memory`] (else since the process started), in MiB,
    and how it was measured: CUDA's peak allocation (`cuda_max_memory_allocated`) when it trains on a GPU, else the
    process's peak resident set size (`cpu_max_rss`, also on a machine that has a GPU but trains with `--use_cpu`):
    `VmHWM` on Linux, which unlike `ru_maxrss` can be reset and does not inherit a parent process's peak; `ru_maxrss`
    elsewhere.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, CUDA_PEAK_KIND
    if os.path.isfile("/proc/self/status"):
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, CPU_PEAK_KIND
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, CPU_PEAK_KIND
