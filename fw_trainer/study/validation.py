"""The study's grid checked before its first run: every run's arguments through the GLUE script's own parser
([`refused_arguments`]), so that a misspelt method or a value the script rejects is found at once."""

import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from typing import Optional

import torch

from ..glue.arguments import parse_args
from .config import StudyConfig, StudyConfigError


# Runs [`argument_errors`] in a child process on the JSON list of command lines it reads, and prints their errors.
_ARGUMENT_CHECK = (
    "import json, sys; from fw_trainer.study.validation import argument_errors; "
    "print(json.dumps(argument_errors(json.load(sys.stdin))))"
)
# Refused runs named in the message, the rest counted.
_NAMED_RUNS = 3


def argument_errors(argvs: list[list[str]]) -> list[Optional[str]]:
    """
    What the GLUE script says of each command line's arguments: its own parser and the checks it makes before writing
    anything ([`parse_args`]), nothing more (no model, data or output directory is looked at). What a parse changes
    in the environment (transformers and accelerate set variables as `TrainingArguments` sets up its device) is
    undone after each, so that one run's arguments do not change how the next one parses.

    Args:
        argvs (`list[list[str]]`): The arguments of each run, as [`run_arguments`] gives them.

    Returns:
        `list[Optional[str]]`: Per command line, the script's message (one line), or `None` where it parses.
    """
    errors: list[Optional[str]] = []
    for argv in argvs:
        environment = dict(os.environ)
        try:
            with redirect_stdout(sys.stderr):  # `--help` prints the help
                parse_args(list(argv))
            errors.append(None)
        except SystemExit:
            errors.append("its arguments ask for --help, which prints the help and exits instead of running.")
        except Exception as error:  # what the run itself would die of before writing anything
            message = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
            errors.append(" ".join(message.split()))
        finally:
            os.environ.clear()
            os.environ.update(environment)
    return errors


def refused_arguments(config: StudyConfig, argvs: list[list[str]]) -> Optional[str]:
    """
    Checks every run of the study with the GLUE script's own parser ([`argument_errors`]) before any run starts, so
    that a misspelt method (`method: fw_lorra`), an unknown option or a value the script rejects is found at once
    rather than when its run comes up, after the runs before it.

    Where CUDA is available the check runs in a child process, with this environment: `TrainingArguments` sets up its
    device as it parses, which would create a CUDA context that the sweep holds for its whole life, taken from its
    runs (as [`query_gpu_memory`] explains). Without CUDA it runs here (a Python start saved). A study with a
    `script` of its own is not checked: its script may take other arguments than the GLUE script's.

    Returns:
        `Optional[str]`: `None` when every run's arguments parse (or the study has a `script`); else one paragraph that
        names the refused runs and the script's message.

    Raises:
        `StudyConfigError`: If the check itself cannot run (the GLUE script cannot be imported, say).
    """
    if config.script:
        return None
    runs = config.runs()
    if not torch.cuda.is_available():
        errors = argument_errors(argvs)
    else:
        check = subprocess.run(
            [sys.executable, "-c", _ARGUMENT_CHECK], input=json.dumps(argvs), capture_output=True, text=True
        )
        try:
            errors = json.loads(check.stdout.strip().splitlines()[-1]) if check.returncode == 0 else None
        except (ValueError, IndexError):
            errors = None
    if not isinstance(errors, list) or len(errors) != len(runs):
        reason = " ".join((check.stderr.strip()[-500:] or check.stdout.strip()[-500:]).split())
        raise StudyConfigError(
            "Cannot check the runs' arguments with the GLUE script's parser before starting them, so none was "
            f"started: {reason or f'the check exited with status {check.returncode}'}"
        )
    refused = [(run, error) for run, error in zip(runs, errors) if error is not None]
    if not refused:
        return None
    first = refused[0][1]
    same = [run.name for run, error in refused if error == first]
    others = [(run, error) for run, error in refused if error != first]
    names = ", ".join(same[:_NAMED_RUNS]) + (f" and {len(same) - _NAMED_RUNS} more" if len(same) > _NAMED_RUNS else "")
    message = (
        f"{config.path}: the GLUE script (run_glue_fw.py) refuses the arguments of {len(refused)} of the study's "
        f"{len(runs)} runs, so none was started. {names}: {first.rstrip('.')}."
    )
    if others:
        (other, error), *_ = others
        message += f" {len(others)} more refused for other reasons, e.g. {other.name}: {error.rstrip('.')}."
    return message + " Fix the study file (or its base_config) and run the sweep again."
