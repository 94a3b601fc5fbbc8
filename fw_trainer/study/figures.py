"""
Figures of runs and studies (matplotlib's object API, no pyplot state, no display needed): confusion matrices, training
curves, bar charts with error bars and the seeds' values, dose-response curves and per-run correlations (the layer ×
role heatmaps are `fw_trainer.heatmap`).
"""

import os
from collections.abc import Sequence
from typing import Optional

import numpy as np
from matplotlib.figure import Figure


# The label of the vertical line at the step a run's importances froze.
FROZEN_MARK_LABEL = "importances frozen"


def save_figure(figure: Figure, path_stem: str) -> list[str]:
    """
    Saves `figure` as `<path_stem>.png` (150 dpi) and `<path_stem>.pdf`; returns the two paths. Neither file records
    when it was written, so re-aggregating unchanged runs leaves committed figures byte for byte as they were.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path_stem)), exist_ok=True)
    paths = [f"{path_stem}.png", f"{path_stem}.pdf"]
    figure.savefig(paths[0], dpi=150, bbox_inches="tight")
    figure.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None})
    return paths


def confusion_matrix_figure(labels: Sequence[int], predictions: Sequence[int], label_names: list[str], title: str):
    """The dev confusion matrix (rows: gold label, columns: prediction) with counts in the cells."""
    from sklearn.metrics import ConfusionMatrixDisplay

    figure = Figure(figsize=(3.6, 3.2), layout="constrained")
    ax = figure.subplots()
    ConfusionMatrixDisplay.from_predictions(
        labels, predictions, labels=list(range(len(label_names))), display_labels=label_names, ax=ax, colorbar=False
    )
    ax.set_title(title, fontsize=10)
    return figure


def training_curves_figure(metrics: dict, title: str) -> Figure:
    """
    Train (task) loss and the dev metric against the optimizer step, with the end of the Fisher warm-up marked.

    Args:
        metrics (`dict`): A run's `metrics.json` (see [`collect_run_metrics`]): `train_loss_history`, `eval_history`,
            `metric_name`, and `frozen_at_step`, where the mark goes (the step the run's importances froze at: 0 for
            IW-LoRA's calibration before the first step; no mark when `None` or absent).
        title (`str`): The figure's title, e.g. the run's name.
    """
    figure = Figure(figsize=(8, 3), layout="constrained")
    loss_ax, metric_ax = figure.subplots(1, 2)
    losses = metrics["train_loss_history"]
    loss_ax.plot([e["step"] for e in losses], [e["loss"] for e in losses])
    loss_ax.set(xlabel="step", ylabel="train task loss")
    name = metrics["metric_name"]
    evals = metrics["eval_history"]
    metric_ax.plot([e["step"] for e in evals], [e[name] for e in evals], marker="o")
    metric_ax.set(xlabel="step", ylabel=f"dev {name}")
    frozen_at_step = metrics.get("frozen_at_step")
    if frozen_at_step is not None:
        for ax in (loss_ax, metric_ax):
            ax.axvline(frozen_at_step, color="grey", linestyle="--", linewidth=1, label=FROZEN_MARK_LABEL)
        loss_ax.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    return figure


def bar_chart_figure(
    panels: dict[str, dict[str, tuple[float, Optional[float]]]],
    ylabel: str,
    zoom: bool = True,
    points: Optional[dict[str, dict[str, Sequence[float]]]] = None,
) -> Figure:
    """
    Grouped bars with error bars: one panel per entry (e.g. a task), one bar per label (e.g. a method).

    Args:
        panels (`dict`): Panel title → (bar label → (mean, error-bar half-width or `None`)).
        ylabel (`str`): The y-axis label (say what the error bars are).
        zoom (`bool`): Start the y axis near the smallest bar (differences between methods are small), not at 0.
        points (`dict`, *optional*): Panel title → (bar label → the values behind the bar, e.g. one per seed), drawn
            as dots over the bar.
    """
    figure = Figure(figsize=(1.2 + 3.4 * len(panels), 3.4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, bars) in zip(axes, panels.items()):
        labels = list(bars)
        means = np.array([bars[label][0] for label in labels], dtype=float)
        errors = np.array([bars[label][1] or 0.0 for label in labels], dtype=float)
        ax.bar(range(len(labels)), means, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(labels))])
        low, high = float(np.min(means - errors, initial=np.inf)), float(np.max(means + errors, initial=-np.inf))
        for i, label in enumerate(labels):
            values = np.asarray((points or {}).get(title, {}).get(label, ()), dtype=float)
            if len(values):
                ax.scatter(np.full(len(values), i), values, s=12, color="black", zorder=3)
                low, high = min(low, float(values.min())), max(high, float(values.max()))
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if zoom and len(means):
            margin = 0.15 * (high - low) if high > low else 0.05 * abs(high) + 1e-3
            ax.set_ylim(min(0.0, low - margin) if low < 0 else max(0.0, low - margin), high + margin)
    return figure


def train_time_figure(panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]]) -> Figure:
    """
    Train time per method: each undisturbed run a dot, their range a bar from the fastest to the slowest with a tick at
    the median; each disturbed run a red cross beside them, left out of the range (its time is not the method's cost).

    Args:
        panels (`dict`): Panel title (e.g. a task) → (label, e.g. a method → (undisturbed runs' seconds, disturbed
            runs' seconds)).
    """
    figure = Figure(figsize=(1.2 + 3.4 * len(panels), 3.4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, cells) in zip(axes, panels.items()):
        labels = list(cells)
        for i, label in enumerate(labels):
            clean, disturbed = (np.asarray(values, dtype=float) for values in cells[label])
            if len(clean):
                ax.vlines(i, clean.min(), clean.max(), color=f"C{i}", linewidth=6, alpha=0.5)
                ax.hlines(np.median(clean), i - 0.2, i + 0.2, color=f"C{i}")
                ax.scatter(np.full(len(clean), i), clean, s=12, color="black", zorder=3)
            if len(disturbed):
                ax.scatter(np.full(len(disturbed), i + 0.25), disturbed, s=24, marker="x", color="red", zorder=3)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("train time (s)")
    figure.suptitle(
        "Train time: undisturbed runs (dots; bar: their range, tick: median); red ×: disturbed, left out", fontsize=10
    )
    return figure


def dose_response_figure(
    panels: dict[str, dict[str, list[tuple[float, float]]]], baselines: dict[str, float], ylabel: str
) -> Figure:
    """
    A metric against the penalty strength λ (log scale): one panel per entry (a task), one line per series.

    Args:
        panels (`dict`): Panel title → (series label → [(λ, value), ...]); several values at one λ (seeds) are drawn
            as dots with their mean on the line.
        baselines (`dict`): Panel title → the unpenalised baseline's value (LoRA), drawn as a dashed line.
        ylabel (`str`): The y-axis label.
    """
    figure = Figure(figsize=(1.2 + 3.6 * len(panels), 3.4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, series) in zip(axes, panels.items()):
        for i, (label, pairs) in enumerate(series.items()):
            lambdas = sorted({lam for lam, _ in pairs})
            means = [np.mean([value for lam, value in pairs if lam == at]) for at in lambdas]
            ax.plot(lambdas, means, marker="o", color=f"C{i}", label=label)
            ax.scatter([lam for lam, _ in pairs], [value for _, value in pairs], s=10, color=f"C{i}", alpha=0.5)
        if title in baselines:
            ax.axhline(baselines[title], color="grey", linestyle="--", linewidth=1, label="LoRA (no penalty)")
        ax.set_xscale("log")
        ax.set(xlabel="penalty strength λ", ylabel=ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    return figure


def correlation_figure(panels: dict[str, dict[str, tuple[Sequence[float], Optional[tuple[float, float]]]]]) -> Figure:
    """
    Per-run correlations by cell, around zero: one panel per entry (a task), one column per cell (a method).

    Args:
        panels (`dict`): Panel title → (cell label → (the runs' correlations, the t interval of their mean or
            `None`)); the dots are the runs, the bar the mean with its interval.
    """
    figure = Figure(figsize=(1.2 + 3.4 * len(panels), 3.4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, cells) in zip(axes, panels.items()):
        for i, (values, interval) in enumerate(cells.values()):
            values = np.asarray(values, dtype=float)
            ax.scatter(np.full(len(values), i), values, s=14, color=f"C{i}", alpha=0.7)
            if len(values):
                mean = float(values.mean())
                error = None if interval is None else [[mean - interval[0]], [interval[1] - mean]]
                ax.errorbar([i + 0.2], [mean], yerr=error, fmt="D", color="black", capsize=4, markersize=4)
        ax.axhline(0.0, color="grey", linewidth=1)
        ax.set_xticks(range(len(cells)), list(cells), rotation=30, ha="right")
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel("Spearman ρ")
        ax.set_title(title, fontsize=10)
    return figure


def pareto_figure(task: str, rows: list[dict]) -> Figure:
    """
    Cost against benefit for one task, two panels: dev metric (mean, t 95 % interval) against adapter parameters and
    against train time (median; horizontal bars: the range of undisturbed runs); cells on a frontier ringed.

    Args:
        task (`str`): The title.
        rows (`list[dict]`): The task's rows of `fw_trainer.study.cost_benefit.cost_benefit_rows`.
    """
    figure = Figure(figsize=(9.0, 3.8), layout="constrained")
    panels = figure.subplots(1, 2)
    for ax, (axis, title) in zip(panels, (("params", "adapter parameters"), ("time", "train time (s), undisturbed"))):
        for i, row in enumerate(rows):
            cost = row["adapter_params"] if axis == "params" else row["train_time_median_s"]
            if cost is None or row["mean"] is None:
                continue
            low = row["mean"] - row["ci_low"] if row["ci_low"] is not None else 0.0
            high = row["ci_high"] - row["mean"] if row["ci_high"] is not None else 0.0
            xerr = None
            if axis == "time":
                xerr = [[cost - row["train_time_min_s"]], [row["train_time_max_s"] - cost]]
            ax.errorbar(cost, row["mean"], yerr=[[low], [high]], xerr=xerr, fmt="o", color=f"C{i}", capsize=3)
            if row[f"frontier_{axis}"]:
                ax.scatter([cost], [row["mean"]], s=160, facecolors="none", edgecolors="black", zorder=3)
            ax.annotate(row["method"], (cost, row["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(title)
        ax.set_ylabel(f"final dev {rows[0]['metric']}")
    figure.suptitle(f"{task}: cost and benefit (mean, t 95 % CI; ringed: on the frontier, means only)", fontsize=10)
    return figure
