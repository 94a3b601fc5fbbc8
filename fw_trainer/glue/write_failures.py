"""A run that cannot write its files (a full disk, a quota, a file-size limit) ends in one paragraph that says what
to free and that running the same command again resumes it, not in the tracebacks of whichever library was writing."""

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

from ..checkpoints import last_complete_checkpoint
from ..errors import UsageError


# The errors a write gets from the kernel when there is no room for it.
NO_ROOM = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file size limit",
}
# torch's serialisation reports a failed write in its own words, without an errno.
_TORCH_WRITE_FAILURES = ("basic_ios::clear", "PytorchStreamWriter failed writing", "unexpected pos")
# safetensors' serialisation error for a full disk, quota or file-size limit.
_STORAGE_FULL = ("StorageFull", "QuotaExceeded", "FileTooLarge", "No space left on device")
# Below this much free space, a failed torch write is taken to be the full disk.
_NEARLY_FULL_BYTES = 16 * 2**20


def write_failure(error: BaseException, output_dir: str) -> Optional[UsageError]:
    """
    The paragraph for `error` if it is a write that found no room, else `None` (the error keeps its traceback).

    Args:
        error (`BaseException`): What the run raised.
        output_dir (`str`): The run's output directory, where it was writing.
    """
    if isinstance(error, OSError) and error.errno in NO_ROOM:
        cause = f"{NO_ROOM[error.errno]} ({error.strerror}{f': {error.filename}' if error.filename else ''})"
    elif any(text in str(error) for text in _STORAGE_FULL):  # safetensors (Rust) words it its own way
        cause = f"the disk is full ({' '.join(str(error).split())[:160]})"
    elif isinstance(error, RuntimeError) and any(text in str(error) for text in _TORCH_WRITE_FAILURES):
        free = _free_bytes(output_dir)
        if free is None or free >= _NEARLY_FULL_BYTES:
            return None
        cause = f"the disk is full ({free / 2**20:.1f} MiB free; torch: {str(error).strip()[:120]})"
    else:
        return None
    last = last_complete_checkpoint(output_dir)
    then = (
        f"run the same command again: it resumes from its last complete checkpoint ({last}), passing over one whose "
        "save was cut off"
        if last is not None
        else "start it again with --overwrite_output_dir: it saved no complete checkpoint to resume from"
    )
    return UsageError(
        f"The run could not write its files in {output_dir}: {cause}. Free space there (or choose another "
        f"--output_dir) and {then}."
    )


@contextmanager
def reported_write_failures(output_dir: str) -> Iterator[None]:
    """Raises the [`write_failure`] paragraph (a `UsageError`) in place of an error that is one; others pass."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        failure = write_failure(error, output_dir)
        if failure is None:
            raise
        raise failure from error


def _free_bytes(path: str) -> Optional[int]:
    while path and not os.path.isdir(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None
