"""
What each method costs for what it gives, across studies: dev metric against trainable parameters and against train
time (a Pareto view, like peft's method comparison), with the paired-seed comparisons read beside it.

The cells come from aggregations (`aggregated_metrics.json`) of one or more studies, as a YAML file lists them:

```yaml
output_dir: results/peft_baselines/cost_benefit
metrics:        # the aggregations whose cells' per-seed dev metrics are compared (a cell may appear in one only)
  - results/fisher_controls/part_b/aggregated_metrics.json
  - results/peft_baselines/variants/aggregated_metrics.json
train_time:     # the aggregations of one stretch of runs whose per-run train times give each cell's cost
  - results/peft_baselines/partb_check/aggregated_metrics.json
  - results/peft_baselines/variants/aggregated_metrics.json
comparisons:    # (a, b) per task, paired over the seeds both have; one Holm family over all of them
  - [dora, lora]
```

A cell is a task and a method (the labels of the studies' `task` and `method` axes). Its train time is the range of
its undisturbed runs in the `train_time` aggregations (`fw_trainer.study.disturbed_runs`): listing only runs of one
stretch there keeps the costs comparable, since runs of another day or load differ by more than the methods do. Its
trainable parameters are the adapter's (peft's count, DoRA's magnitudes included); the classifier head, the same for
every method, is left out. A cell is on the frontier of an axis when no other cell of its task has a dev metric at
least as high at a cost at most as low (one of the two strictly): the frontier reads the means and ignores the seed
noise, which is what the comparisons are for.

    python -m fw_trainer.study.cost_benefit configs/cost_benefit/peft_baselines.yaml

writes `cost_benefit.csv`, `cost_benefit.md` and `figures/pareto_<task>.{png,pdf}` into `output_dir`.
"""

import argparse
import csv
import json
import os
import sys
from typing import Any, Optional

import yaml

from ..state_files import write_json_atomic
from .aggregate import comparison_columns
from .comparisons import adjust_family, paired_comparison
from .config import StudyConfigError, exit_status
from .disturbed_runs import undisturbed_range
from .figures import pareto_figure, save_figure


COST_BENEFIT_FILE = "cost_benefit.csv"
_KNOWN_KEYS = {"output_dir", "metrics", "train_time", "comparisons"}


def _read_aggregation(path: str) -> list[dict]:
    """The groups of an `aggregated_metrics.json` (of one study file, or each part of a combined one; a cell that two
    parts share, such as Part A's LoRA runs reused by Part B, once)."""
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, ValueError) as error:
        raise StudyConfigError(
            f"{path} cannot be read as an aggregation ({error}): aggregate its study first "
            "(`python -m fw_trainer.study.aggregate <study.yaml>`)."
        ) from error
    parts = document.get("parts", {"": document}) if isinstance(document, dict) else None
    if not isinstance(parts, dict) or not all(
        isinstance(part, dict) and isinstance(part.get("groups"), list) for part in parts.values()
    ):
        raise StudyConfigError(f"{path} is not an aggregated_metrics.json: it has no `groups` list.")
    groups = {}
    for part, document in parts.items():
        for group in document["groups"]:
            same = groups.setdefault(group["name"], group)
            if same is not group and (same["seeds"], same["final"]) != (group["seeds"], group["final"]):
                raise StudyConfigError(
                    f"{path}: its parts hold two different cells named {group['name']} (part {part} among them): "
                    "list the parts' own aggregations instead."
                )
    return list(groups.values())


def _cell(group: dict, path: str) -> tuple[str, str]:
    """A group's cell: its labels on the `task` axis (else its task name) and on the `method` axis."""
    labels = group["group"]
    if "method" not in labels:
        raise StudyConfigError(f"{path}: group {group['name']} has no `method` axis to compare methods by.")
    return (labels["task"] if "task" in labels else group["task_name"]), labels["method"]


def load_cells(metrics_paths: list[str], time_paths: list[str]) -> dict[tuple[str, str], dict]:
    """
    The cells `(task, method)` of the `metrics` aggregations, each with its per-seed dev metric and adapter parameters,
    and the train time of its runs in the `train_time` aggregations.

    Raises:
        `StudyConfigError`: If two aggregations hold the same cell's metric (which to pair would be a guess).
    """
    cells: dict[tuple[str, str], dict] = {}
    for path in metrics_paths:
        for group in _read_aggregation(path):
            key = _cell(group, path)
            if key in cells:
                raise StudyConfigError(
                    f"The cell {'/'.join(key)} is in {cells[key]['metric_source']} and in {path}: list each cell's "
                    "dev metric in one aggregation only."
                )
            cells[key] = {
                "task": key[0],
                "method": key[1],
                "metric_name": group["metric_name"],
                "seeds": [str(seed) for seed in group["seeds"]],
                "final": group["final"],
                "final_metric": group["final_metric"],
                "adapter_params": group.get("adapter_params"),
                "metric_source": path,
                "train_seconds": [],
                "time_source": None,
            }
    for path in time_paths:
        for group in _read_aggregation(path):
            key = _cell(group, path)
            if key not in cells:
                continue
            if "train_time" not in group:
                raise StudyConfigError(
                    f"{path} holds no per-run train times (it predates them): aggregate its study again, or leave "
                    "it out of `train_time`."
                )
            runs = [run for run in group["train_time"]["per_run"] if not run["disturbed"] and run["seconds"]]
            cells[key]["train_seconds"] += [run["seconds"] for run in runs]
            cells[key]["time_source"] = ", ".join(filter(None, [cells[key]["time_source"], path]))
    return cells


def frontier(points: dict[str, tuple[float, Optional[float]]]) -> set[str]:
    """
    The Pareto frontier of a task's cells.

    Args:
        points (`dict`): Label → `(value, cost)`: the dev metric, higher better (as every GLUE metric), and the cost,
            lower better, or `None` when unknown.

    Returns:
        `set[str]`: The labels that no other point dominates (at least as high a value at most as high a cost, one of
        the two strictly); a point without a cost is on no frontier.
    """
    known = {label: point for label, point in points.items() if point[1] is not None}

    def dominated(value: float, cost: float) -> bool:
        return any(
            other_value >= value and other_cost <= cost and (other_value > value or other_cost < cost)
            for other_value, other_cost in known.values()
        )

    return {label for label, (value, cost) in known.items() if not dominated(value, cost)}


def cost_benefit_rows(cells: dict[tuple[str, str], dict]) -> list[dict[str, Any]]:
    """One row per cell (tasks in first-seen order): the dev metric's mean and t interval, the adapter parameters, the
    range of undisturbed train times, and whether the cell is on its task's frontier of each axis."""
    rows = []
    for task in dict.fromkeys(task for task, _ in cells):
        members = {method: cell for (cell_task, method), cell in cells.items() if cell_task == task}
        times = {method: undisturbed_range(cell["train_seconds"]) for method, cell in members.items()}
        means = {method: cell["final_metric"]["mean"] for method, cell in members.items()}
        on_params = frontier({m: (means[m], members[m]["adapter_params"]) for m in members})
        on_time = frontier({m: (means[m], times[m]["median"]) for m in members})
        for method, cell in members.items():
            summary = cell["final_metric"]
            rows.append(
                {
                    "task": task,
                    "method": method,
                    "metric": cell["metric_name"],
                    "seeds": len(cell["seeds"]),
                    "mean": summary["mean"],
                    "ci_low": summary["ci_low"],
                    "ci_high": summary["ci_high"],
                    "adapter_params": cell["adapter_params"],
                    "train_time_runs": times[method]["n"],
                    "train_time_min_s": times[method]["min"],
                    "train_time_median_s": times[method]["median"],
                    "train_time_max_s": times[method]["max"],
                    "frontier_params": method in on_params,
                    "frontier_time": method in on_time,
                    "metric_source": cell["metric_source"],
                    "time_source": cell["time_source"] or "",
                }
            )
    return rows


def comparisons(cells: dict[tuple[str, str], dict], pairs: list[tuple[str, str]]) -> list[dict]:
    """Each pair `(a, b)` in each task that has both, paired over the seeds both have; Holm over all of them."""
    tests = []
    for a, b in pairs:
        for task in dict.fromkeys(task for task, _ in cells):
            if (task, a) not in cells or (task, b) not in cells:
                continue
            cell_a, cell_b = cells[task, a], cells[task, b]
            by_seed_a, by_seed_b = (
                dict(zip(cell_a["seeds"], cell_a["final"])),
                dict(zip(cell_b["seeds"], cell_b["final"])),
            )
            seeds = [seed for seed in cell_a["seeds"] if seed in by_seed_b]
            if not seeds:
                raise StudyConfigError(
                    f"The comparison {a} − {b} on {task} has no seed on both sides ({a}: {cell_a['seeds']}, {b}: "
                    f"{cell_b['seeds']}): a comparison pairs the same seeds. Compare cells that share seeds."
                )
            values_a, values_b = [by_seed_a[s] for s in seeds], [by_seed_b[s] for s in seeds]
            tests.append(
                {
                    "task": task,
                    "a": a,
                    "b": b,
                    "metric_name": cell_a["metric_name"],
                    **paired_comparison(seeds, values_a, values_b),
                }
            )
    return adjust_family(tests)


def _format_number(value: Optional[float], digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict], tests: list[dict]) -> str:
    """`cost_benefit.md`: the cells and the comparisons."""
    lines = [
        "| task | method | seeds | final dev (mean) | t 95 % CI | adapter params | train time, undisturbed (s) | "
        "frontier (params / time) | metric from | time from |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        span = "–"
        if row["train_time_runs"]:
            span = f"{row['train_time_min_s']:.0f}–{row['train_time_max_s']:.0f} ({row['train_time_runs']} runs)"
        frontier_marks = f"{'yes' if row['frontier_params'] else 'no'} / {'yes' if row['frontier_time'] else 'no'}"
        params = "–" if row["adapter_params"] is None else f"{row['adapter_params']:,}"
        lines.append(
            f"| {row['task']} | {row['method']} | {row['seeds']} | {_format_number(row['mean'], 4)} | "
            f"[{_format_number(row['ci_low'], 4)}, {_format_number(row['ci_high'], 4)}] | {params} | {span} | "
            f"{frontier_marks} | {row['metric_source']} | {row['time_source'] or '–'} |"
        )
    if tests:
        lines += [
            "",
            "Comparisons, paired over seeds (final dev metric; Holm over all rows; MDD: the smallest true difference "
            "the paired t-test detects with 80 % power at α = 0.05).",
            "",
            "| task | a − b | n | Δ mean | t 95 % CI | bootstrap 95 % CI | t p | Holm t p | Wilcoxon p | "
            "Holm Wilcoxon p | MDD | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for test in tests:
            lines.append(f"| {test['task']} | {test['a']} − {test['b']} | {comparison_columns(test)} |")
    return "\n".join(lines) + "\n"


def read_spec(path: str) -> dict[str, Any]:
    """The YAML file of the module docstring, checked."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as error:
        raise StudyConfigError(f"{path} cannot be read as YAML: {' '.join(str(error).split())}") from error
    if not isinstance(spec, dict) or not spec.get("output_dir") or not spec.get("metrics"):
        raise StudyConfigError(
            f"{path} should hold `output_dir`, `metrics` (a list of aggregated_metrics.json) and, "
            "optionally, `train_time` and `comparisons`: see fw_trainer/study/cost_benefit.py."
        )
    unknown = sorted(set(spec) - _KNOWN_KEYS)
    if unknown:
        raise StudyConfigError(f"{path}: unknown key(s) {unknown}; a cost/benefit file has {sorted(_KNOWN_KEYS)}.")
    for key in ("metrics", "train_time"):
        if not isinstance(spec.get(key) or [], list):
            raise StudyConfigError(f"{path}: `{key}` should be a list of aggregated_metrics.json paths.")
    pairs = spec.get("comparisons") or []
    if not all(isinstance(pair, list) and len(pair) == 2 for pair in pairs):
        raise StudyConfigError(f"{path}: each comparison should be a pair of methods, e.g. `[dora, lora]`.")
    return {**spec, "train_time": spec.get("train_time") or [], "comparisons": [tuple(pair) for pair in pairs]}


def write_cost_benefit(spec: dict[str, Any], figures: bool = True) -> dict[str, Any]:
    """Writes the CSV, the Markdown tables, the comparisons (JSON) and the figures; returns the rows and tests."""
    cells = load_cells(spec["metrics"], spec["train_time"])
    if not cells:
        raise StudyConfigError(f"The aggregations {spec['metrics']} hold no cell: aggregate their studies first.")
    methods = {method for _, method in cells}
    missing = sorted({label for pair in spec["comparisons"] for label in pair} - methods)
    if missing:
        raise StudyConfigError(
            f"The comparisons name method(s) no aggregation holds: {missing} (have {sorted(methods)})."
        )
    rows = cost_benefit_rows(cells)
    tests = comparisons(cells, spec["comparisons"])
    out = spec["output_dir"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, COST_BENEFIT_FILE), "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "cost_benefit.md"), "w", encoding="utf-8") as f:
        f.write(markdown(rows, tests))
    write_json_atomic(os.path.join(out, "comparisons.json"), {"tests": tests})
    if figures:
        for task in dict.fromkeys(row["task"] for row in rows):
            task_rows = [row for row in rows if row["task"] == task]
            save_figure(pareto_figure(task, task_rows), os.path.join(out, "figures", f"pareto_{task}"))
    print(markdown(rows, tests))
    return {"rows": rows, "tests": tests}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fw_trainer.study.cost_benefit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spec", help="The cost/benefit YAML file (see above).")
    parser.add_argument("--no_figures", action="store_true", help="Write the tables only.")
    args = parser.parse_args(argv)
    return exit_status(lambda: write_cost_benefit(read_spec(args.spec), figures=not args.no_figures))


if __name__ == "__main__":
    sys.exit(main())
