"""Counting the operators that launch a kernel, with `torch.profiler`, on any device: the CPU-side proxy of a GPU step's
kernel launches (on a GPU each of them is at least one launch)."""

from collections import Counter
from collections.abc import Callable

import torch


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


def launched_ops(profile: torch.profiler.profile) -> Counter:
    """The outermost aten operators of a profile that launch at least one kernel, by name."""
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


def count_launched_ops(fn: Callable[[], object]) -> Counter:
    """[`launched_ops`] of one call of `fn`."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return launched_ops(profile)
