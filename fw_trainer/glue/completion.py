"""
A finished run, by content: the script writes `run_complete.json` last, once every phase it was asked for (training,
evaluation, prediction, or a search) has ended; it lists those phases and the size (and, for files up to 64 MiB, the
SHA-256) of every file the run left in its output directory. A run is finished when that record is whole and every
file it lists is still as recorded ([`completion_problem`]); the script, its resume logic, the study's sweep and its
aggregation all ask [`is_finished_run`], never whether some file exists.
"""

import fnmatch
import hashlib
import json
import os
from typing import Optional

from ..state_files import write_json_atomic
from .run_files import RUN_OUTPUTS


RUN_COMPLETE_FILE = "run_complete.json"
# The phases a run can be asked for, by their `TrainingArguments` switch: what the record lists.
PHASES = {"train": "do_train", "eval": "do_eval", "predict": "do_predict"}
# Files larger than this (a fully fine-tuned model) are recorded by size only: hashing them at every sweep start would
# cost seconds per run, and a truncated one changes size anyway.
_HASHED_UP_TO = 64 * 2**20


def _fingerprint(path: str) -> dict:
    size = os.path.getsize(path)
    if size > _HASHED_UP_TO:
        return {"bytes": size}
    with open(path, "rb") as file:
        return {"bytes": size, "sha256": hashlib.sha256(file.read()).hexdigest()}


def write_completion(output_dir: str, phases: list[str]) -> None:
    """Records the run in `output_dir` as finished: the `phases` it ran and every file it left there (not the
    subdirectories: checkpoints and TensorBoard events are not results). Written atomically, as the run's last file."""
    # The run's own files only: not the lock, temporary files, the sweep's `metrics.json` or a user's notes, which may
    # change afterwards without making the run any less finished.
    files = sorted(
        name
        for name in os.listdir(output_dir)
        if os.path.isfile(os.path.join(output_dir, name))
        and any(fnmatch.fnmatch(name, pattern) for pattern in RUN_OUTPUTS)
        and name != RUN_COMPLETE_FILE
        and not name.startswith(".tmp-")
    )
    record = {"phases": phases, "files": {name: _fingerprint(os.path.join(output_dir, name)) for name in files}}
    write_json_atomic(os.path.join(output_dir, RUN_COMPLETE_FILE), record)


def invalidate_completion(output_dir: str) -> None:
    """Removes the completion record before a run writes into `output_dir` (a resume of a finished run, say): a run
    killed after that is not taken for the finished one whose record it would otherwise inherit."""
    try:
        os.remove(os.path.join(output_dir, RUN_COMPLETE_FILE))
    except FileNotFoundError:
        pass


def completion_problem(output_dir: str) -> Optional[str]:
    """`None` if `output_dir` holds a finished run, else why not, in words: no completion record (a phase it was asked
    for did not end), a damaged one, or a file it lists that is missing or no longer as recorded."""
    path = os.path.join(output_dir, RUN_COMPLETE_FILE)
    if not os.path.isfile(path):
        return f"it has no {RUN_COMPLETE_FILE}: a phase the run was asked for did not end"
    try:
        with open(path, encoding="utf-8") as file:
            record = json.load(file)
        files = record["files"]
        recorded = {name: (entry["bytes"], entry.get("sha256")) for name, entry in files.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {RUN_COMPLETE_FILE} is damaged"
    for name, (size, digest) in recorded.items():
        file_path = os.path.join(output_dir, name)
        if not os.path.isfile(file_path):
            return f"{name}, which the finished run left, is missing"
        now = _fingerprint(file_path)
        if now["bytes"] != size or (digest is not None and now.get("sha256") != digest):
            return f"{name} is not the file the finished run left (changed or incomplete)"
    return None


def is_finished_run(output_dir: str) -> bool:
    """Whether `output_dir` holds a finished run ([`completion_problem`] has nothing to say)."""
    return completion_problem(output_dir) is None
