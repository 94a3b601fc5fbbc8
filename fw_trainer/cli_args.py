"""Arguments given as a mapping (a YAML config file, a study's grid cell) turned into `run_glue_fw.py` flags."""

from typing import Any


def to_argv(args: dict[str, Any]) -> list[str]:
    """Arguments as `run_glue_fw.py` flags; `None` leaves an argument unset."""
    argv = []
    for key, value in args.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        argv += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}", str(value)]
    return argv
