"""One sweep at a time on a study ([`StudyDirectoryLock`]): a second sweep of the same study is refused at once."""

import json
import os
import socket
from typing import Any, Optional

from ..errors import UsageError
from ..glue.run_directory import OutputDirectoryLock, missing_directories


# Held by the sweep running a study, in the study's output directory: its process id, host and start.
SWEEP_LOCK_FILE = "fw_sweep.lock"


class StudyDirectoryLock(OutputDirectoryLock):
    """
    One sweep at a time on a study: `fw_sweep.lock` in the study's output directory (the process id, host and start of
    the sweep holding it), taken before the first run starts and removed when the sweep ends, aggregation included.
    A second sweep of the same study would start the same unfinished runs into the output directories that the first
    sweep's runs hold (each run holds its own, [`OutputDirectoryLock`]): every one of them would fail. It is refused at
    once instead, naming the sweep that holds the study. As for a run, a lock left by a sweep on this host whose
    process is gone (killed) is taken over with a warning.

    Args:
        output_dir (`str`): The study's output directory (created when the lock is taken).

    Raises:
        `UsageError`: On entering, if another sweep holds the study.
    """

    def __init__(self, output_dir: str):
        super().__init__(output_dir)
        self.path = os.path.join(output_dir, SWEEP_LOCK_FILE)
        self._created: list[str] = []

    def __enter__(self) -> "StudyDirectoryLock":
        self._created = missing_directories(self.output_dir)
        try:
            os.makedirs(self.output_dir, exist_ok=True)
        except OSError as error:  # said here as a study's, not as a run's `--output_dir`
            raise UsageError(
                f"The study's output directory {self.output_dir} cannot be created ({error.strerror}). Nothing was "
                "run. Set another `output_dir` in the study file."
            ) from error
        try:
            super().__enter__()
        except BaseException:
            self._remove_created()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        super().__exit__(*exc_info)
        self._remove_created()

    def _remove_created(self) -> None:
        """Removes the directories that taking the lock created, if they are still empty: a sweep refused before its
        first run (the memory check, say) leaves nothing behind."""
        for directory in self._created:  # deepest first
            try:
                os.rmdir(directory)
            except OSError:
                break

    def _take_over_if_stale(self) -> None:
        try:
            super()._take_over_if_stale()
        except UsageError as error:  # held by a sweep that runs, or that cannot be checked from here
            holder = _read_holder(self.path)
            if holder is None:
                raise
            where = f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            if holder.get("host") == socket.gethostname():
                what_to_do = (
                    "Wait for it to end, or stop it (Ctrl-C in its terminal, or `kill "
                    f"{holder.get('pid')}`: its runs continue from their last checkpoint next time), then run this "
                    "command again."
                )
            else:
                what_to_do = (
                    "That host cannot be checked from here: wait for that sweep to end or stop it; if it has ended "
                    f"already, remove {self.path}."
                )
            raise UsageError(
                f"Another sweep is running this study in {self.output_dir} ({where}): this one would start the same "
                f"runs, whose output directories that sweep's runs hold, and each would fail. Nothing was run. "
                f"{what_to_do}"
            ) from error


def _read_holder(path: str) -> Optional[dict[str, Any]]:
    """The holder recorded in a lock file, or `None` if it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None
