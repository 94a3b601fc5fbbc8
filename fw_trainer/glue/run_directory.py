"""
The output directory a run owns: one run at a time ([`OutputDirectoryLock`]), what a new run does with what it finds
there ([`checkpoint_to_resume`]: resume it, refuse, or with `--overwrite_output_dir` start clean through
[`clear_previous_run`]), and the directories writing into it would create.
"""

import datetime
import fnmatch
import json
import logging
import os
import shutil
import socket
from typing import Any, Optional

from ..checkpoints import last_complete_checkpoint, last_weights_only_checkpoint
from ..errors import UsageError
from .completion import RUN_COMPLETE_FILE, completion_problem
from .run_files import LOCK_FILE, RUN_OUTPUTS


logger = logging.getLogger(__name__)


def _contents(output_dir: str) -> list[str]:
    """What the directory holds, but the lock of the run that looks."""
    return sorted(name for name in os.listdir(output_dir) if name != LOCK_FILE)


def checkpoint_to_resume(
    output_dir: str, overwrite_output_dir: bool, resume_from_checkpoint: Optional[str], do_train: bool
) -> Optional[str]:
    """
    What a run does with its output directory, before it writes anything: never writes over a finished run unless
    `overwrite_output_dir`, which removes the previous run's files ([`clear_previous_run`]); resumes an interrupted one
    from its last complete checkpoint (as run_glue does), passing over a checkpoint whose save was interrupted.

    Returns:
        The checkpoint of `output_dir` to resume from, if any (`None` too when `resume_from_checkpoint` names one).

    Raises:
        `UsageError`: If the directory holds a finished run, or files but no complete checkpoint, and
            `overwrite_output_dir` is not set.
    """
    if not os.path.isdir(output_dir) or not _contents(output_dir):
        return None
    if overwrite_output_dir:
        clear_previous_run(output_dir)
        return None
    if resume_from_checkpoint is not None:
        return None
    unfinished = completion_problem(output_dir)
    if unfinished is None:
        raise UsageError(
            f"The output directory {output_dir} already holds a finished run ({RUN_COMPLETE_FILE}). Nothing was "
            "changed. Pass --overwrite_output_dir to replace it, --resume_from_checkpoint to continue it, or choose "
            "another --output_dir."
        )
    last_checkpoint = last_complete_checkpoint(output_dir) if do_train else None
    if last_checkpoint is None:
        weights_only = last_weights_only_checkpoint(output_dir) if do_train else None
        warm_start = (
            f" Its last checkpoint, {weights_only}, holds the weights without the training state (--save_only_model): "
            f"pass --resume_from_checkpoint {weights_only} --resume_weights_only to warm-start from it (the "
            "optimizer and the learning-rate schedule start again), which --overwrite_output_dir would delete."
            if weights_only is not None
            else ""
        )
        raise UsageError(
            f"The output directory {output_dir} is not empty and holds no complete checkpoint to resume from (nor a "
            f"finished run: {unfinished}). Nothing was changed.{warm_start} Pass --overwrite_output_dir to write into "
            "it anyway, or choose another --output_dir."
        )
    logger.info(
        "Checkpoint detected, resuming training at %s. To avoid this behavior, change the `--output_dir` or add "
        "`--overwrite_output_dir` to train from scratch.",
        last_checkpoint,
    )
    return last_checkpoint


def clear_previous_run(output_dir: str) -> list[str]:
    """
    Removes what a previous run wrote into `output_dir` ([`RUN_OUTPUTS`]: checkpoints, state files, results,
    predictions, TensorBoard events, the model and tokenizer), so that nothing of it is taken for the new run's.
    Anything else is kept, and named in a warning.

    Returns:
        `list[str]`: The names kept.
    """
    removed, kept = [], []
    for name in _contents(output_dir):
        path = os.path.join(output_dir, name)
        if any(fnmatch.fnmatch(name, pattern) for pattern in RUN_OUTPUTS):
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            removed.append(name)
        else:
            kept.append(name)
    logger.warning(
        "--overwrite_output_dir: removed the previous run's %d files and folders from %s%s.",
        len(removed),
        output_dir,
        f"; kept what a run does not write: {', '.join(kept)}" if kept else "",
    )
    return kept


def missing_directories(path: str) -> list[str]:
    """The directories of `path` that do not exist yet, deepest first: those that writing into `path` creates."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def check_writable(output_dir: str) -> None:
    """
    Checks that a run can write into `output_dir`: it is a directory (or can be created as one) and writable.

    Raises:
        `UsageError`: Saying what is in the way.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"The output directory {output_dir} is a file. Choose another --output_dir.")
    existing = output_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing):
        raise UsageError(f"The output directory {output_dir} cannot be created: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"The output directory {output_dir} cannot be written: {existing} is not writable by this user. Choose "
            "another --output_dir."
        )


class OutputDirectoryLock:
    r"""
    One run at a time in an output directory: `fw_run.lock` (the process id, host and start of the run holding it),
    created atomically before the run writes anything and removed when it ends. A second run into a directory in use is
    refused, whatever its flags. A lock left by a killed run on this host (its process is gone) is taken over with a
    warning; one from another host cannot be checked, and the message says how to remove it.

    Use it as a context manager, in the main process only (with several processes, the main one holds it for all).

    Args:
        output_dir (`str`): The run's output directory (created when the lock is taken).
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._held = False

    def __enter__(self) -> "OutputDirectoryLock":
        try:
            os.makedirs(self.output_dir, exist_ok=True)
        except OSError as error:  # e.g. below /proc, or a read-only file system, even for root
            raise UsageError(
                f"The output directory {self.output_dir} cannot be created ({error.strerror}). Choose another "
                "--output_dir."
            ) from error
        holder = self._me()
        for _ in range(3):  # a stale lock is removed, then taken again, atomically
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8") as f:
                json.dump(holder, f)
            self._held = True
            return self
        raise UsageError(f"Could not take the lock {self.path}: other runs keep starting in {self.output_dir}.")

    def __exit__(self, *exc_info: Any) -> None:
        if self._held:
            self._held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    @staticmethod
    def _me() -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "process_start": _process_start(os.getpid()),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
        }

    def _take_over_if_stale(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):
            holder = None  # being written, or damaged
        if not isinstance(holder, dict) or not {"pid", "host"} <= set(holder):
            age = datetime.datetime.now().timestamp() - os.path.getmtime(self.path)
            if age < 10:  # probably being written: look again
                return
            holder = {"pid": None, "host": None}
        if holder["host"] == socket.gethostname() and _is_alive(holder["pid"], holder.get("process_start")):
            raise UsageError(
                f"The output directory {self.output_dir} is in use by another run (process {holder['pid']} on this "
                f"host, started {holder.get('started', 'at an unknown time')}). Nothing was written. Wait for that "
                "run to end, or choose another --output_dir."
            )
        if holder["host"] not in (None, socket.gethostname()):
            raise UsageError(
                f"The output directory {self.output_dir} is in use by a run on another host ({holder['host']}, "
                f"process {holder['pid']}, started {holder.get('started')}), which cannot be checked from here. "
                f"Nothing was written. If that run has ended, remove {self.path}; else choose another --output_dir."
            )
        logger.warning(
            "Taking over %s, left by a run that is gone (process %s, started %s): it was killed before it could "
            "remove it.",
            self.path,
            holder["pid"],
            holder.get("started", "at an unknown time"),
        )
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def _process_start(pid: int) -> Optional[str]:
    """The start time of a process (Linux: field 22 of `/proc/<pid>/stat`), to tell a reused process id apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _is_alive(pid: Any, process_start: Optional[str]) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    # The id may have been reused by a new process since: compare start times where both are known.
    current = _process_start(pid)
    return process_start is None or current is None or current == process_start
