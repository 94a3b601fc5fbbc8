"""
The figures of a study's report (drawn with `fw_trainer.study.figures` and `fw_trainer.heatmap`): per run, training
curves and the dev confusion matrix; per study, the dev metric with 95 % intervals and the seeds, the cost (train time
and peak memory), the dose-response of a study that varies λ, the capacity correlations, and layer × role heatmaps of
the importances and of `‖ΔW‖_F`.
"""

import os
from collections import defaultdict
from typing import Optional

import numpy as np

from ..glue.tsv_layout import GLUE_LABEL_NAMES
from ..heatmap import heatmap_figure
from .capacity import BASELINE_METHOD
from .comparisons import load_eval_predictions
from .config import SEED_AXIS, StudyConfig
from .figures import (
    bar_chart_figure,
    confusion_matrix_figure,
    correlation_figure,
    dose_response_figure,
    save_figure,
    train_time_figure,
    training_curves_figure,
)
from .run_metrics import group_key, group_name


def _mean_over_seeds(members: list[dict], field: str) -> Optional[dict[str, float]]:
    maps = [m[field] for m in members if m.get(field)]
    if not maps:
        return None
    return {name: float(np.mean([values[name] for values in maps])) for name in maps[0]}


def _half_width(summary: dict) -> Optional[float]:
    return None if summary["ci_high"] is None else summary["ci_high"] - summary["mean"]


def _split(key: tuple, axis: str) -> tuple[str, str]:
    """A cell's panel (its labels on the other axes, e.g. the task) and its label on the compared axis."""
    context = group_name(tuple((k, v) for k, v in key if k != axis)) or "all"
    return context, dict(key).get(axis, group_name(key))


def penalty_family(args: dict) -> str:
    """The weights a penalised run used, in words: the series of a dose-response curve."""
    if args.get("fw_power") == 0:
        return "uniform weights"
    shuffled = ", shuffled" if args.get("fw_shuffle_seed") is not None else ""
    return f"Fisher weights ({args.get('fw_normalization', 'sum')}{shuffled})"


def dose_response_panels(runs: list[dict], axis: str) -> tuple[dict, dict]:
    """The final dev metric against λ per panel and penalty family, where a panel's FW-LoRA runs use at least three
    values of `fw_lambda`; LoRA's mean in that panel as the baseline."""
    panels, baselines, lora = defaultdict(lambda: defaultdict(list)), {}, defaultdict(list)
    for metrics in runs:
        context, _ = _split(group_key(metrics), axis)
        title = f"{context} ({metrics['metric_name']})"
        args = metrics["args"]
        if args.get("method") == "fw_lora" and args.get("fw_lambda") is not None:
            panels[title][penalty_family(args)].append((float(args["fw_lambda"]), metrics["final_metric"]))
        elif args.get("method") == BASELINE_METHOD:
            lora[title].append(metrics["final_metric"])
    panels = {
        title: dict(series)
        for title, series in panels.items()
        if len({lam for pairs in series.values() for lam, _ in pairs}) >= 3
    }
    baselines = {title: float(np.mean(values)) for title, values in lora.items() if title in panels}
    return panels, baselines


def study_figures(
    runs: list[dict],
    groups: list[dict],
    correlations: list[dict],
    capacity: list[dict],
    config: StudyConfig,
    figures_dir: str,
) -> list[str]:
    """The study's figures, as listed in the module docstring (each as PNG and PDF); returns their paths."""
    # Bars and panels compare along the study's comparison axis (else its last axis but the seed's).
    axis = config.comparison_axis or ([a for a in config.axes if a != SEED_AXIS] or [SEED_AXIS])[-1]
    paths = []
    metric, seeds = defaultdict(dict), defaultdict(dict)
    runtime, memory = defaultdict(dict), defaultdict(dict)
    for row in groups:
        context, label = _split(tuple(row["group"].items()), axis)
        title = f"{context} ({row['metric_name']})"
        metric[title][label] = (row["final_metric"]["mean"], _half_width(row["final_metric"]))
        seeds[title][label] = row["final"]
        per_run = row["train_time"]["per_run"]
        runtime[context][label] = tuple(
            [run["seconds"] for run in per_run if run["disturbed"] is disturbed and run["seconds"] is not None]
            for disturbed in (False, True)
        )
        if row["train_peak_memory_mb"]["mean"] is not None:
            memory[context][label] = (row["train_peak_memory_mb"]["mean"], row["train_peak_memory_mb"]["std"])
    figure = bar_chart_figure(metric, "final dev metric (mean, 95 % CI; dots: seeds)", points=seeds)
    paths += save_figure(figure, os.path.join(figures_dir, "dev_metric"))
    paths += save_figure(train_time_figure(runtime), os.path.join(figures_dir, "train_time"))
    if memory:
        figure = bar_chart_figure(memory, "peak memory (MB, mean ± std)", zoom=False)
        paths += save_figure(figure, os.path.join(figures_dir, "peak_memory"))

    panels, baselines = dose_response_panels(runs, axis)
    if panels:
        figure = dose_response_figure(panels, baselines, "final dev metric")
        paths += save_figure(figure, os.path.join(figures_dir, "dose_response"))

    if correlations:
        summaries = {row["group"]: row["measured_rho"] for row in capacity}
        cells = defaultdict(dict)
        for row in correlations:
            context, label = _split(tuple((k, v) for k, v in row["labels"].items() if k != SEED_AXIS), axis)
            values, _ = cells[context].get(label, ([], None))
            if row["measured_rho"] is not None:
                values = values + [row["measured_rho"]]
            summary = summaries[row["group"]]
            interval = None if summary["ci_low"] is None else (summary["ci_low"], summary["ci_high"])
            cells[context][label] = (values, interval)
        figure = correlation_figure(cells)
        figure.suptitle(
            "Did capacity move? ρ(F_m, ‖ΔW_m‖ / ‖ΔW_m‖ of LoRA); dots: seeds, ◆: mean and 95 % CI", fontsize=10
        )
        paths += save_figure(figure, os.path.join(figures_dir, "capacity_correlation"))

    by_context = defaultdict(lambda: defaultdict(list))
    for metrics in runs:
        context, label = _split(group_key(metrics), axis)
        by_context[context][label].append(metrics)
    for context, methods in by_context.items():
        stem = context.replace("/", "_")
        where = "" if context == "all" else f", {context}"
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
