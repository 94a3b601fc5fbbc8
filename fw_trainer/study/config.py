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
    shuffled: {method: fw_lora, fw_shuffle_seed: "${seed}"}   # `${name}`: the value of the run's argument `name`
  seed: [0, 1, 2]                           # plain values of the argument named like the axis
comparisons:                                # significance tests along one axis, paired over the seed axis
  axis: method
  pairs: [[fw_lora_max, lora]]
```
"""

import itertools
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


SEED_AXIS = "seed"
# A value that is the whole string `${name}` takes the value of the run's argument `name` (e.g. a control's permutation
# seed tied to the training seed, so that each seed draws its own permutation rather than all sharing one).
_REFERENCE = re.compile(r"^\$\{(\w+)\}$")


class StudyConfigError(ValueError):
    """A study that cannot be run (its file, or its runs' arguments); the message says what to change."""


def exit_status(action: Callable[[], Any]) -> int:
    """Runs a command's `action`: 0 when it is done, 2 with its one `error:` paragraph on stderr when it raises
    [`StudyConfigError`]."""
    try:
        action()
    except StudyConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


class _RepeatedKey(yaml.YAMLError):
    """A key given twice in one mapping of a study file."""

    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(key, first_line, line)
        self.key, self.first_line, self.line = key, first_line, line


class _StudyLoader(yaml.SafeLoader):
    """`yaml.safe_load`, but a key given twice in one mapping is refused: PyYAML would silently keep the last (an axis
    variant, an argument, `axes` itself), and the grid would lose a cell without a word."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first_line = lines.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: SafeLoader refuses it itself
                    continue
                if first_line != key_node.start_mark.line + 1:
                    raise _RepeatedKey(key, first_line, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


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
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.load(f, Loader=_StudyLoader) or {}
            except _RepeatedKey as error:
                raise StudyConfigError(
                    f"{path}: the key {error.key!r} is given twice in one mapping (lines {error.first_line} and "
                    f"{error.line}); YAML would silently keep the second, and a grid cell or an argument would be "
                    "lost. Remove or rename one of them."
                ) from error
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
        for axis, variants in self.axes.items():
            directories: dict[str, str] = {}
            for label in variants:
                directory = StudyRun({axis: label}, {}).name
                if directories.setdefault(directory, label) != label:
                    raise StudyConfigError(
                        f"{self.path}: labels {directories[directory]!r} and {label!r} of axis {axis!r} both name "
                        f"the run directory {directory!r} (a label that does not start with a letter gets the axis's "
                        "name in front): the two would share their runs. Rename one of them."
                    )
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
        self.runs()  # every `${name}` reference resolves

    def runs(self) -> list[StudyRun]:
        """Every cell of the grid, the last axis varying fastest."""
        runs = []
        for combination in itertools.product(*(variants.items() for variants in self.axes.values())):
            args = dict(self.args)
            for _, variant_args in combination:
                args.update(variant_args)
            labels = {axis: label for axis, (label, _) in zip(self.axes, combination)}
            runs.append(StudyRun(labels, self._resolve_references(args, labels)))
        return runs

    def _resolve_references(self, args: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
        """`args` with each `${name}` value replaced by the value of the argument `name` (itself not a reference)."""
        resolved = dict(args)
        for key, value in args.items():
            match = _REFERENCE.match(value) if isinstance(value, str) else None
            if match is None:
                continue
            name = match.group(1)
            if name not in args or (isinstance(args[name], str) and _REFERENCE.match(args[name])):
                problem = (
                    "is not an argument the study file gives this run (references resolve among `args` and the axes, "
                    "not `base_config`)"
                    if name not in args
                    else "is itself a reference"
                )
                raise StudyConfigError(
                    f"{self.path}: `{key}: {value}` of run {StudyRun(labels, {}).name} refers to `{name}`, which "
                    f"{problem}; a `${{name}}` value takes the value of another argument the run has (e.g. "
                    "`${seed}`). Name one of them, or give the value itself."
                )
            resolved[key] = args[name]
        return resolved


def _axis_variants(path: str, axis: str, values: Any) -> dict[str, dict[str, Any]]:
    """
    An axis as `{label: arguments}`: a mapping is taken as is, a list `[v, ...]` means `{str(v): {axis: v}}`.

    Raises:
        `StudyConfigError`: If a variant is not a mapping of arguments, or a value or label is given twice (`seed: [0,
            0, 1]`, `[1, "1"]` or `[0.001, 1.0e-3]`): the grid would silently hold one run for both.
    """
    if isinstance(values, dict):
        for label, variant in values.items():
            if not isinstance(variant, dict):
                raise StudyConfigError(
                    f"{path}: variant {label!r} of axis {axis!r} should be a mapping of arguments, e.g. "
                    f"`{label}: {{method: {label}}}`."
                )
        _refuse_repeats(path, axis, list(values), "label")
        return {str(label): dict(variant) for label, variant in values.items()}
    if isinstance(values, list) and values:
        _refuse_repeats(path, axis, values, "value")
        return {str(value): {axis: value} for value in values}
    raise StudyConfigError(
        f"{path}: axis {axis!r} should be a non-empty list of values or a mapping of named variants, got {values!r}."
    )


def _refuse_repeats(path: str, axis: str, values: list, what: str) -> None:
    """Refuses two of an axis's values (or labels) that are the same label (`1` and `"1"`) or the same number (`0.001`
    and `1.0e-3`), naming the axis and the value."""

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    for at, value in enumerate(values):
        for earlier in values[:at]:
            if str(earlier) == str(value) or (number(earlier) and number(value) and earlier == value):
                same = f"{earlier!r} and {value!r} are the same {what}" if repr(earlier) != repr(value) else ""
                raise StudyConfigError(
                    f"{path}: axis {axis!r} has the {what} {value!r} twice{f' ({same})' if same else ''} in "
                    f"{values!r}: a repeat is not one more run (the grid would silently hold one run for both, or the "
                    "same run twice). Remove the repeat or change it."
                )
