"""The code a study's runs ran on, recorded beside each result so a study that spans several stretches of compute
can show which commit every run came from."""

import os
import subprocess
from typing import Optional

from ..version import __version__


def code_revision(source_dir: Optional[str] = None) -> dict[str, object]:
    """
    The git commit of the checkout that `fw_trainer` is imported from, and whether it had uncommitted changes.

    Args:
        source_dir (`str`, *optional*): A directory inside the checkout; by default the imported `fw_trainer`'s.

    Returns:
        `dict`: `{"commit": sha, "dirty": bool}` for a git checkout (dirty counts changes to tracked files only:
        run outputs are untracked), else `{"fw-lora": version}` for an installed package.
    """
    source_dir = source_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", *args], cwd=source_dir, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"fw-lora": __version__}
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
