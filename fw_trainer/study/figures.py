"""
Figures of runs and studies (matplotlib's object API, no pyplot state, no display needed): confusion matrices, training
curves and bar charts with error bars (the layer × role heatmaps are `fw_trainer.heatmap`).
"""

import os
from collections.abc import Sequence
from typing import Optional

import numpy as np
from matplotlib.figure import Figure


# The label of the vertical line at the step a run's importances froze.
FROZEN_MARK_LABEL = "importances frozen"


def save_figure(figure: Figure, path_stem: str) -> list[str]:
    """Saves `figure` as `<path_stem>.png` (150 dpi) and `<path_stem>.pdf`; returns the two paths."""
    os.makedirs(os.path.dirname(os.path.abspath(path_stem)), exist_ok=True)
    paths = [f"{path_stem}.png", f"{path_stem}.pdf"]
    figure.savefig(paths[0], dpi=150, bbox_inches="tight")
    figure.savefig(paths[1], bbox_inches="tight")
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
    panels: dict[str, dict[str, tuple[float, Optional[float]]]], ylabel: str, zoom: bool = True
) -> Figure:
    """
    Grouped bars with error bars: one panel per entry (e.g. a task), one bar per label (e.g. a method).

    Args:
        panels (`dict`): Panel title → (bar label → (mean, std or `None`)).
        ylabel (`str`): The y-axis label.
        zoom (`bool`): Start the y axis near the smallest bar (differences between methods are small), not at 0.
    """
    figure = Figure(figsize=(1.2 + 3.4 * len(panels), 3.4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, bars) in zip(axes, panels.items()):
        labels = list(bars)
        means = np.array([bars[label][0] for label in labels], dtype=float)
        stds = np.array([bars[label][1] or 0.0 for label in labels], dtype=float)
        ax.bar(range(len(labels)), means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if zoom and len(means):
            low, high = float(np.min(means - stds)), float(np.max(means + stds))
            margin = 0.15 * (high - low) if high > low else 0.05 * abs(high) + 1e-3
            ax.set_ylim(min(0.0, low - margin) if low < 0 else max(0.0, low - margin), high + margin)
    return figure
