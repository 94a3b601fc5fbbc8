"""
A study: a grid of `run_glue_fw.py` runs (tasks × methods × budgets × seeds × any argument) described in one YAML file.

```yaml
output_dir: outputs/studies/cpu_minilm      # one sub-directory per run: <output_dir>/sst2/lora/seed0
results_dir: results/cpu_minilm             # aggregated tables, statistics and figures
base_config: configs/quickstart_cpu.yaml    # optional: a run_glue_fw.py YAML every run starts from
args:                                       # arguments shared by every run (override base_config)
  lora_r: 8
axes:                                       # the grid, outermost first
  task:                                     # named variants: label -> arguments
    sst2: {task_name: sst2, max_train_samples: 8000}
    cola: {task_name: cola}
  method:
    lora: {method: lora}
    fw_lora_max: {method: fw_lora, fw_normalization: max}
  seed: [0, 1, 2]                           # plain values of the argument named like the axis
comparisons:                                # significance tests along one axis, paired over the seed axis
  axis: method
  pairs: [[fw_lora_max, lora]]
```
"""

import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


SEED_AXIS = "seed"


class StudyConfigError(ValueError):
    """A study file that cannot be run; the message says what to change."""


@dataclass(frozen=True)
class StudyRun:
    """
    One cell of the grid.

    Args:
        labels (`dict[str, str]`): The cell's label on each axis, in axis order, e.g. `{"task": "sst2", "seed": "0"}`.
        args (`dict[str, Any]`): The `run_glue_fw.py` arguments of this run (shared ones, then each axis's), without
            `output_dir`.
    """

    labels: dict[str, str]
    args: dict[str, Any]

    @property
    def name(self) -> str:
        """`sst2/fw_lora_max/seed0`: the run's directory relative to the study's `output_dir` (a label that is not a
        name, such as a number, is prefixed with its axis: `seed0`, `learning_rate0.001`)."""
        return "/".join(label if label[:1].isalpha() else f"{axis}{label}" for axis, label in self.labels.items())

    @property
    def group(self) -> tuple[tuple[str, str], ...]:
        """The labels on every axis but the seed's: the runs that aggregation averages over seeds."""
        return tuple((axis, label) for axis, label in self.labels.items() if axis != SEED_AXIS)


@dataclass
class StudyConfig:
    """A parsed study file (see the module docstring)."""

    path: str
    output_dir: str
    results_dir: str
    axes: dict[str, dict[str, dict[str, Any]]]
    args: dict[str, Any] = field(default_factory=dict)
    base_config: Optional[str] = None
    # A script to run instead of the installed GLUE runner (`python -m fw_trainer.glue.run`), e.g. a wrapper of it.
    script: Optional[str] = None
    comparison_axis: Optional[str] = None
    comparison_pairs: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def from_yaml(cls, path: str) -> "StudyConfig":
        if os.path.isdir(path):
            raise StudyConfigError(
                f"{path} is a directory: pass the study's YAML file (e.g. configs/studies/cpu_minilm.yaml), not its "
                "output or results directory."
            )
        if not os.path.isfile(path):
            raise StudyConfigError(f"The study file {path} does not exist.")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as error:
                raise StudyConfigError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from error
        if not isinstance(raw, dict):
            raise StudyConfigError(
                f"{path} should hold a mapping with `output_dir`, `results_dir`, `args` and `axes`."
            )
        known = {"output_dir", "results_dir", "args", "axes", "base_config", "script", "comparisons"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise StudyConfigError(f"{path}: unknown key(s) {unknown}; a study file has {sorted(known)}.")
        for key in ("output_dir", "results_dir", "axes"):
            if not raw.get(key):
                raise StudyConfigError(f"{path} has no `{key}`: see the example in fw_trainer/study/config.py.")
        here = os.path.dirname(os.path.abspath(path))
        base_config = raw.get("base_config")
        if base_config is not None and not os.path.isfile(base_config):
            # Relative to the working directory first (like every other path), else to the study file.
            if not os.path.isfile(os.path.join(here, base_config)):
                raise StudyConfigError(f"{path}: base_config {base_config} does not exist.")
            base_config = os.path.join(here, base_config)
        comparisons = raw.get("comparisons") or {}
        config = cls(
            path=path,
            output_dir=raw["output_dir"],
            results_dir=raw["results_dir"],
            axes={axis: _axis_variants(path, axis, values) for axis, values in raw["axes"].items()},
            args=dict(raw.get("args") or {}),
            base_config=base_config,
            script=raw.get("script"),
            comparison_axis=comparisons.get("axis"),
            comparison_pairs=[tuple(pair) for pair in comparisons.get("pairs", [])],
        )
        config._validate()
        return config

    def _validate(self) -> None:
        if "output_dir" in self.args or any("output_dir" in v for a in self.axes.values() for v in a.values()):
            raise StudyConfigError(
                f"{self.path}: `output_dir` is set per run by the sweep; remove it from `args`/`axes`."
            )
        if self.comparison_pairs:
            if self.comparison_axis not in self.axes:
                raise StudyConfigError(
                    f"{self.path}: comparisons.axis {self.comparison_axis!r} is not one of the axes {list(self.axes)}."
                )
            labels = self.axes[self.comparison_axis]
            for pair in self.comparison_pairs:
                if len(pair) != 2 or any(label not in labels for label in pair):
                    raise StudyConfigError(
                        f"{self.path}: comparison {list(pair)} should name two of {list(labels)} "
                        f"(the labels of axis {self.comparison_axis!r})."
                    )

    def runs(self) -> list[StudyRun]:
        """Every cell of the grid, the last axis varying fastest."""
        runs = []
        for combination in itertools.product(*(variants.items() for variants in self.axes.values())):
            args = dict(self.args)
            for _, variant_args in combination:
                args.update(variant_args)
            labels = {axis: label for axis, (label, _) in zip(self.axes, combination)}
            runs.append(StudyRun(labels, args))
        return runs


def _axis_variants(path: str, axis: str, values: Any) -> dict[str, dict[str, Any]]:
    """An axis as `{label: arguments}`: a mapping is taken as is, a list `[v, ...]` means `{str(v): {axis: v}}`."""
    if isinstance(values, dict):
        for label, variant in values.items():
            if not isinstance(variant, dict):
                raise StudyConfigError(
                    f"{path}: variant {label!r} of axis {axis!r} should be a mapping of arguments, e.g. "
                    f"`{label}: {{method: {label}}}`."
                )
        return {str(label): dict(variant) for label, variant in values.items()}
    if isinstance(values, list) and values:
        return {str(value): {axis: value} for value in values}
    raise StudyConfigError(
        f"{path}: axis {axis!r} should be a non-empty list of values or a mapping of named variants, got {values!r}."
    )
