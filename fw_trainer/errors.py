"""The errors a user can cause when a run starts or resumes: scripts report them as one paragraph, without a traceback
(the GLUE script's `main` is the one place that does: [`USER_FAULTS`])."""

from typing import Any


# Long values (module lists) are cut to this many items in a message.
_SHOWN_ITEMS = 3


class _Absent:
    def __repr__(self) -> str:
        return "absent"


# The value of a field that one side of a [`RunMismatchError`] does not have (e.g. `fw_lambda` for plain LoRA).
ABSENT = _Absent()


class UsageError(ValueError):
    """Input a user gave (an argument, a file, a directory) that cannot run. The message says what is wrong and what to
    do instead."""


class CheckpointError(UsageError):
    """The checkpoint to resume from cannot be resumed: it does not exist, is not a checkpoint, is incomplete or
    damaged, or does not fit the model being trained. The message says which, and what to do."""


class RunMismatchError(CheckpointError):
    """
    The checkpoint to resume from is another run than the one asked for (another method, rank, task, learning rate,
    ...): resuming it would label its results with a run that did not produce them.

    Args:
        checkpoint_dir (`str`): The checkpoint.
        differences (`list[tuple[str, Any, Any]]`):
            Each differing field, with its value in the checkpoint and in the run asked for ([`ABSENT`] where one side
            does not have the field, e.g. the arguments of another method).
    """

    def __init__(self, checkpoint_dir: str, differences: list[tuple[str, Any, Any]]):
        self.checkpoint_dir = checkpoint_dir
        self.differences = differences
        rows = [_describe_difference(*d) for d in differences if d[1] is not ABSENT and d[2] is not ABSENT]
        for side, index in (("the checkpoint", 2), ("the run asked for", 1)):
            # A field only one side has: the arguments of a method the other side does not use, named in a list.
            names = [d[0] for d in differences if d[index] is ABSENT]
            if names:
                rows.append(f"only {side} has {_cut(names)}")
        super().__init__(
            f"The checkpoint {checkpoint_dir} is another run than the one asked for: {'; '.join(rows)}. Resume it "
            "with the arguments it was trained with, or start a new run instead of resuming it."
        )


class WarmupDivergedError(RuntimeError):
    """The FW-LoRA warm-up (or IW-LoRA's calibration) ended without one finite micro-batch: every loss or gradient was
    NaN or infinite, so there is nothing to compute importances from."""


# Every fault a user can cause, as a script reports it: bad input, and a warm-up that diverged from the first step.
USER_FAULTS = (UsageError, WarmupDivergedError)


def _describe_difference(name: str, saved: Any, asked: Any) -> str:
    if isinstance(saved, list) and isinstance(asked, list):
        only_saved = [item for item in saved if item not in asked]
        only_asked = [item for item in asked if item not in saved]
        return (
            f"{name}: {len(saved)} in the checkpoint, {len(asked)} asked (only in the checkpoint: "
            f"{_cut(only_saved)}; only asked: {_cut(only_asked)})"
        )
    return f"{name}: {_show(saved)} in the checkpoint, {_show(asked)} asked"


def _show(value: Any) -> str:
    if value is None:
        return "none"
    return _cut(value) if isinstance(value, list) else repr(value)


def _cut(items: list) -> str:
    if not items:
        return "none"
    shown = ", ".join(map(str, items[:_SHOWN_ITEMS]))
    return shown + (f" and {len(items) - _SHOWN_ITEMS} more" if len(items) > _SHOWN_ITEMS else "")
