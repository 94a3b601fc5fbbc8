"""
Which runs of a study shared the machine with other work, and the train time of the others.

On a shared machine a run's train time is its cost only if nothing else ran beside it: a test suite or a second study
on the same cores inflates it by tens of per cent, more than the differences between methods. Whoever runs a study
records the runs that other work disturbed, with what it was, in `<results_dir>/disturbed_runs.yaml`:

```yaml
# run name -> what else ran on the machine during its training
sst2/lora/seed0: "the default test suite, 18:17-18:22"
cola/fisher_max/seed1: "installing torch beside the project"
```

The aggregation then reports each cell's cost as the range of its undisturbed runs, marks the disturbed ones in the
train-time figure and leaves them out of the range; their dev metrics count as every other run's (load changes the
time a run takes, not what it computes).
"""

import os
from typing import Any, Optional

import numpy as np
import yaml

from .config import SEED_AXIS, StudyConfig, StudyConfigError


DISTURBED_RUNS_FILE = "disturbed_runs.yaml"


def read_disturbed_runs(config: StudyConfig) -> dict[str, str]:
    """
    The study's record of disturbed runs (run name → what disturbed it); empty when it has no record.

    Raises:
        `StudyConfigError`: If the record is not a mapping of run names to reasons, or names a run the study does
            not have.
    """
    path = os.path.join(config.results_dir, DISTURBED_RUNS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            record = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise StudyConfigError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from error
    if not isinstance(record, dict) or not all(isinstance(reason, str) and reason for reason in record.values()):
        raise StudyConfigError(
            f"{path} should map each disturbed run's name to what disturbed it, e.g. `sst2/lora/seed0: \"the test "
            'suite, 18:17-18:22"`.'
        )
    names = {run.name for run in config.runs()}
    unknown = sorted(str(name) for name in record if name not in names)
    if unknown:
        raise StudyConfigError(
            f"{path} names run(s) that {config.path} does not have: {', '.join(unknown)}. Use the run names the sweep "
            f"prints (e.g. {next(iter(sorted(names)))})."
        )
    return {str(name): reason for name, reason in record.items()}


def train_time_record(members: list[dict], disturbed: dict[str, str]) -> dict[str, Any]:
    """
    The train time of a cell's runs: each run's (`per_run`: seed, seconds, whether disturbed) and the range of the
    undisturbed ones (`undisturbed`: `n`, `min`, `median`, `max`; `None` values when every run was disturbed or none
    recorded a time).
    """
    per_run = [
        {"seed": run["labels"].get(SEED_AXIS), "seconds": run["train_runtime"], "disturbed": run["run"] in disturbed}
        for run in members
    ]
    clean = [row["seconds"] for row in per_run if not row["disturbed"] and row["seconds"] is not None]
    return {"per_run": per_run, "undisturbed": undisturbed_range(clean)}


def undisturbed_range(seconds: list[float]) -> dict[str, Optional[float]]:
    """`n`, `min`, `median` and `max` of the undisturbed runs' train times."""
    if not seconds:
        return {"n": 0, "min": None, "median": None, "max": None}
    return {"n": len(seconds), "min": min(seconds), "median": float(np.median(seconds)), "max": max(seconds)}


def format_train_time(record: dict[str, Any]) -> str:
    """`326–329 (3 of 5)`: the range of the undisturbed runs and how many of the cell's runs it holds."""
    undisturbed, total = record["undisturbed"], len(record["per_run"])
    if undisturbed["n"] == 0:
        return f"– (0 of {total} undisturbed)"
    low, high = undisturbed["min"], undisturbed["max"]
    span = f"{low:.0f}" if round(low) == round(high) else f"{low:.0f}–{high:.0f}"
    return f"{span} ({undisturbed['n']} of {total})"
