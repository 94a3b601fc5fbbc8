"""
Aggregates a finished (or partly finished) study into the artefacts of a paper, in the study's `results_dir`:

- `runs/<run>/metrics.json` and `eval_predictions_*.tsv`: each run's summary and dev predictions (copied);
- `runs/<run>/confusion_matrix.{png,pdf}` and `curves.{png,pdf}`: per-run figures;
- `aggregated_metrics.json`: per group (every axis but the seed) mean, std and 95 % CI of the final and best dev
  metric, train time and peak memory;
- `significance_tests.json`: the study's comparisons, paired over seeds (t-test, Wilcoxon) and per seed (McNemar);
- `results.md`: both as Markdown tables;
- `figures/`: bar charts of the dev metric and train time, importance heatmaps, `‖ΔW‖_F` heatmaps per method.

    python -m fw_trainer.study.aggregate configs/studies/cpu_minilm.yaml
"""

import argparse
import json
import os
import shutil
import sys
from collections import defaultdict
from typing import Optional

import numpy as np

from ..glue.data import GLUE_LABEL_NAMES
from ..glue.run_outputs import EVAL_PREDICTIONS_FILE
from ..heatmap import heatmap_figure
from ..state_files import write_json_atomic
from .config import SEED_AXIS, StudyConfig, StudyConfigError
from .figures import bar_chart_figure, confusion_matrix_figure, save_figure, training_curves_figure
from .run_metrics import METRICS_FILE
from .statistics import mcnemar, paired_tests, summarize


def load_finished_runs(config: StudyConfig) -> list[dict]:
    """The `metrics.json` of every finished run of the study, in grid order, with `run_dir` added."""
    runs = []
    for run in config.runs():
        path = os.path.join(config.output_dir, run.name, METRICS_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                metrics = json.load(f)
            metrics["run_dir"] = os.path.dirname(path)
            runs.append(metrics)
    return runs


def group_key(metrics: dict) -> tuple[tuple[str, str], ...]:
    return tuple((axis, label) for axis, label in metrics["labels"].items() if axis != SEED_AXIS)


def group_name(key: tuple[tuple[str, str], ...]) -> str:
    return "/".join(label for _, label in key)


def aggregate_groups(runs: list[dict]) -> list[dict]:
    """
    One entry per group of runs that differ only in their seed.

    Returns:
        `list[dict]`: `group` (axis → label), `name`, `metric_name`, `seeds`, per-seed `final` and `best` values and,
        from [`summarize`], `final_metric`, `best_metric`, `train_runtime` and `train_peak_memory_mb` summaries, plus
        `adapter_params`.
    """
    groups = defaultdict(list)
    for metrics in runs:
        groups[group_key(metrics)].append(metrics)
    rows = []
    for key, members in groups.items():
        adapter = members[0].get("adapter") or {}
        rows.append(
            {
                "group": dict(key),
                "name": group_name(key),
                "task_name": members[0]["task_name"],
                "method": members[0]["args"].get("method"),
                "metric_name": members[0]["metric_name"],
                "seeds": [m["labels"].get(SEED_AXIS) for m in members],
                "final": [m["final_metric"] for m in members],
                "best": [m["best_metric"] for m in members],
                "final_metric": summarize([m["final_metric"] for m in members]),
                "best_metric": summarize([m["best_metric"] for m in members]),
                "train_runtime": summarize([m["train_runtime"] for m in members if m["train_runtime"] is not None]),
                "train_peak_memory_mb": summarize(
                    [m["train_peak_memory_mb"] for m in members if m["train_peak_memory_mb"] is not None]
                ),
                "adapter_params": adapter.get("adapter_params"),
            }
        )
    return rows


def load_eval_predictions(run: dict) -> Optional[np.ndarray]:
    """The run's dev predictions as rows of (index, label, prediction): the task's own file (for MNLI the matched
    one), else the first; `None` for a regression (STS-B) or a run without predictions."""
    if GLUE_LABEL_NAMES.get(run["task_name"], ()) is None:  # STS-B: a regression, no right or wrong
        return None
    preferred = EVAL_PREDICTIONS_FILE.format(task=run["task_name"])
    files = [preferred] if preferred in run["eval_predictions"] else run["eval_predictions"][:1]
    if not files:
        return None
    return np.loadtxt(os.path.join(run["run_dir"], files[0]), delimiter="\t", skiprows=1, ndmin=2)


def _correct(run: dict) -> Optional[np.ndarray]:
    """Per dev example, whether the run's final prediction is right (classification only)."""
    table = load_eval_predictions(run)
    return None if table is None else table[:, 1] == table[:, 2]


def significance_tests(runs: list[dict], config: StudyConfig) -> list[dict]:
    """
    For each comparison `(a, b)` of the study and each group of the other axes: paired tests of the final dev metric
    over the seeds both ran, and McNemar's test on the dev predictions of each seed.
    """
    axis = config.comparison_axis
    by_cell = {
        (tuple((k, v) for k, v in group_key(m) if k != axis), m["labels"][axis], m["labels"].get(SEED_AXIS)): m
        for m in runs
    }
    contexts = list(dict.fromkeys(context for context, _, _ in by_cell))
    tests = []
    for a, b in config.comparison_pairs:
        for context in contexts:
            seeds = [s for (c, label, s) in by_cell if c == context and label == a and (c, b, s) in by_cell]
            if not seeds:
                continue
            run_a = [by_cell[context, a, s] for s in seeds]
            run_b = [by_cell[context, b, s] for s in seeds]
            entry = {
                "group": dict(context),
                "axis": axis,
                "a": a,
                "b": b,
                "metric_name": run_a[0]["metric_name"],
                "compared": "final dev metric",
                "seeds": seeds,
                "a_values": [m["final_metric"] for m in run_a],
                "b_values": [m["final_metric"] for m in run_b],
                **paired_tests([m["final_metric"] for m in run_a], [m["final_metric"] for m in run_b]),
                "mcnemar": [],
            }
            for seed, one, two in zip(seeds, run_a, run_b):
                correct_one, correct_two = _correct(one), _correct(two)
                if correct_one is not None and correct_two is not None:
                    entry["mcnemar"].append({"seed": seed, **mcnemar(correct_one, correct_two)})
            tests.append(entry)
    return tests


def _format(summary: dict, digits: int = 4) -> str:
    if summary["mean"] is None:
        return "–"
    if summary["std"] is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def _p(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3g}"


def markdown_tables(groups: list[dict], tests: list[dict]) -> str:
    """The two tables of `results.md`: metrics per group, and the significance tests."""
    lines = [
        "| group | metric | n | final dev (mean ± std) | 95 % CI | best dev (mean ± std) | train time (s) | peak memory (MB) "
        "| adapter params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in groups:
        final = row["final_metric"]
        ci = "–" if final["ci_low"] is None else f"[{final['ci_low']:.4f}, {final['ci_high']:.4f}]"
        params = "–" if row["adapter_params"] is None else f"{row['adapter_params']:,}"
        lines.append(
            f"| {row['name']} | {row['metric_name']} | {final['n']} | {_format(final)} | {ci} | "
            f"{_format(row['best_metric'])} | {_format(row['train_runtime'], 1)} | "
            f"{_format(row['train_peak_memory_mb'], 0)} | {params} |"
        )
    if tests:
        lines += [
            "",
            "| group | a vs b | metric | Δ mean (a − b) | paired t p | Wilcoxon p | McNemar p per seed (a only / b only "
            "correct) |",
            "|---|---|---|---|---|---|---|",
        ]
        for test in tests:
            per_seed = "; ".join(
                f"seed {m['seed']}: {_p(m['pvalue'])} ({m['a_only_correct']}/{m['b_only_correct']})"
                for m in test["mcnemar"]
            )
            lines.append(
                f"| {group_name(tuple(test['group'].items())) or '–'} | {test['a']} vs {test['b']} | "
                f"{test['metric_name']} | {test['mean_difference']:+.4f} | {_p(test['t_pvalue'])} | "
                f"{_p(test['wilcoxon_pvalue'])} | {per_seed or '–'} |"
            )
    return "\n".join(lines) + "\n"


def _mean_over_seeds(members: list[dict], field: str) -> Optional[dict[str, float]]:
    maps = [m[field] for m in members if m.get(field)]
    if not maps:
        return None
    return {name: float(np.mean([values[name] for values in maps])) for name in maps[0]}


def study_figures(runs: list[dict], groups: list[dict], config: StudyConfig, figures_dir: str) -> list[str]:
    """The study's figures: dev metric and train time bars, importance and `‖ΔW‖_F` heatmaps (means over seeds)."""
    # Bars and panels compare along the study's comparison axis (else its last axis but the seed's).
    axis = config.comparison_axis or ([a for a in config.axes if a != SEED_AXIS] or [SEED_AXIS])[-1]
    paths = []
    # One panel per value of the other axes (e.g. the task), one bar per label of the compared axis (the method).
    panels, runtime_panels = defaultdict(dict), defaultdict(dict)
    for row in groups:
        context = group_name(tuple((k, v) for k, v in row["group"].items() if k != axis)) or "all"
        label = row["group"].get(axis, row["name"])
        panels[f"{context} ({row['metric_name']})"][label] = (row["final_metric"]["mean"], row["final_metric"]["std"])
        runtime_panels[context][label] = (row["train_runtime"]["mean"], row["train_runtime"]["std"])
    paths += save_figure(bar_chart_figure(panels, "final dev metric"), os.path.join(figures_dir, "dev_metric"))
    paths += save_figure(
        bar_chart_figure(runtime_panels, "train time (s)", zoom=False), os.path.join(figures_dir, "train_time")
    )

    by_group = defaultdict(list)
    for metrics in runs:
        by_group[group_key(metrics)].append(metrics)
    contexts = defaultdict(dict)
    for key, members in by_group.items():
        context = tuple((k, v) for k, v in key if k != axis)
        contexts[context][dict(key).get(axis, group_name(key))] = members
    for context, methods in contexts.items():
        stem = group_name(context).replace("/", "_") or "all"
        where = f", {group_name(context)}" if context else ""
        importances = {label: _mean_over_seeds(m, "importances") for label, m in methods.items()}
        importances = {label: values for label, values in importances.items() if values}
        if importances:
            figure = heatmap_figure(importances, "importance I (mean over seeds)", shared_scale=False)
            figure.suptitle(f"FW-LoRA importances{where}", fontsize=10)
            paths += save_figure(figure, os.path.join(figures_dir, f"importance_heatmap_{stem}"))
        norms = {label: _mean_over_seeds(m, "delta_weight_norms") for label, m in methods.items()}
        norms = {label: values for label, values in norms.items() if values}
        if norms:
            figure = heatmap_figure(norms, "‖ΔW‖_F at the end (mean over seeds)")
            figure.suptitle(f"Where each method put its capacity{where}", fontsize=10)
            paths += save_figure(figure, os.path.join(figures_dir, f"delta_weight_norms_{stem}"))
    return paths


def run_figures(metrics: dict, out_dir: str) -> list[str]:
    """A run's training curves (with the step its importances froze at) and, for a classification task, its dev
    confusion matrix."""
    paths = save_figure(training_curves_figure(metrics, metrics["run"]), os.path.join(out_dir, "curves"))
    names = GLUE_LABEL_NAMES.get(metrics["task_name"])
    table = load_eval_predictions(metrics) if names else None
    if table is not None:
        figure = confusion_matrix_figure(table[:, 1].astype(int), table[:, 2].astype(int), names, metrics["run"])
        paths += save_figure(figure, os.path.join(out_dir, "confusion_matrix"))
    return paths


def aggregate_study(config: StudyConfig, figures: bool = True) -> dict:
    """Writes every artefact listed in the module docstring into `config.results_dir`; returns what it wrote."""
    runs = load_finished_runs(config)
    expected = len(config.runs())
    if not runs:
        raise StudyConfigError(
            f"No finished run of {config.path} in {config.output_dir}: run `python -m fw_trainer.study.sweep {config.path}` "
            "first."
        )
    results_dir = config.results_dir
    groups = aggregate_groups(runs)
    tests = significance_tests(runs, config) if config.comparison_pairs else []
    header = {"study": config.path, "finished_runs": len(runs), "expected_runs": expected}
    write_json_atomic(os.path.join(results_dir, "aggregated_metrics.json"), {**header, "groups": groups})
    write_json_atomic(os.path.join(results_dir, "significance_tests.json"), {**header, "tests": tests})
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        if len(runs) < expected:
            f.write(f"**Partial: {len(runs)} of {expected} runs finished.**\n\n")
        f.write(markdown_tables(groups, tests))

    written = {"groups": groups, "tests": tests, "figures": []}
    for metrics in runs:
        out_dir = os.path.join(results_dir, "runs", metrics["run"])
        os.makedirs(out_dir, exist_ok=True)
        for name in [METRICS_FILE, *metrics["eval_predictions"]]:
            shutil.copyfile(os.path.join(metrics["run_dir"], name), os.path.join(out_dir, name))
        if figures:
            written["figures"] += run_figures(metrics, out_dir)
    if figures:
        written["figures"] += study_figures(runs, groups, config, os.path.join(results_dir, "figures"))
    print(f"Aggregated {len(runs)} of {expected} runs into {results_dir}:\n")
    print(markdown_tables(groups, tests))
    return written


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fw_trainer.study.aggregate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", help="The study YAML file that the sweep ran.")
    parser.add_argument("--no_figures", action="store_true", help="Write the tables and statistics only.")
    args = parser.parse_args(argv)
    try:
        aggregate_study(StudyConfig.from_yaml(args.study), figures=not args.no_figures)
    except StudyConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
