"""
`metrics.json`: everything the study aggregation needs from one finished `run_glue_fw.py` output directory.
"""

import json
import os
from typing import Any, Optional

from ..glue.completion import completion_problem
from ..glue.metrics import PRIMARY_GLUE_METRIC
from ..glue.run_outputs import (
    ADAPTER_SUMMARY_FILE,
    ALL_RESULTS_FILE,
    DELTA_WEIGHT_NORMS_FILE,
    EVAL_PREDICTIONS_FILE,
    TRAINER_STATE_FILE,
)
from ..run_environment import RUN_ENVIRONMENT_FILE
from ..state_files import IMPORTANCE_FILE
from .config import SEED_AXIS


METRICS_FILE = "metrics.json"


def primary_metric(task_name: Optional[str], eval_results: dict[str, Any]) -> str:
    """The metric to compare for a task (`matthews_correlation` for CoLA, `pearson` for STS-B, else `accuracy`); for a
    custom dataset, `accuracy` or `mse`, whichever the run reports."""
    if task_name in PRIMARY_GLUE_METRIC:
        return PRIMARY_GLUE_METRIC[task_name]
    for name in ("accuracy", "mse"):
        if f"eval_{name}" in eval_results:
            return name
    raise ValueError(f"Cannot tell which metric to compare: the eval results hold {sorted(eval_results)}.")


def collect_run_metrics(run_dir: str, task_name: Optional[str], extra: Optional[dict[str, Any]] = None) -> dict:
    """
    Summarises a finished run directory (read with [`read_run_artifacts`]).

    Args:
        run_dir (`str`): A `run_glue_fw.py --output_dir` holding `all_results.json` and `trainer_state.json`.
        task_name (`str`, *optional*): The GLUE task (picks the primary metric); `None` for a custom dataset.
        extra (`dict`, *optional*): Merged into the result (the sweep adds the run's name, labels and arguments).

    Returns:
        `dict`: `metric_name`, `final_metric` (the last evaluation), `best_metric` and `best_step` (the best of the
        evaluations during training; an optimistic number, since dev selects and scores), `eval_history` and
        `train_loss_history` (step, epoch, value), `train_runtime`, `train_samples_per_second`,
        `train_peak_memory_mb` and its kind, the adapter summary, the frozen FW-LoRA importances and the step they
        froze at (`frozen_at_step`: 0 for IW-LoRA's calibration before the first step; both `None` for a method
        without them), the end-of-training `‖ΔW‖_F` per matrix (or `None`), the file names of the dev predictions, and
        `adapter_file_bytes` and `hardware` from `run_environment.json` (both `None` for a run that predates it).

    Raises:
        `FileNotFoundError`: If the run has not finished ([`completion_problem`] says why).
    """
    unfinished = completion_problem(run_dir)
    if unfinished is not None:
        raise FileNotFoundError(f"{run_dir} is not a finished run: {unfinished}.")
    artifacts = read_run_artifacts(run_dir)
    results = artifacts["all_results"]
    if results is None:  # a finished search, a predict-only run, a study `script` that writes no results
        raise FileNotFoundError(
            f"{run_dir} is finished but holds no {ALL_RESULTS_FILE}: it has no results to collect."
        )
    state = artifacts["trainer_state"] or {"log_history": []}
    metric = primary_metric(task_name, results)
    key = f"eval_{metric}"

    eval_history = [
        {"step": log["step"], "epoch": log.get("epoch"), metric: log[key]}
        for log in state["log_history"]
        if key in log
    ]
    loss_history = [
        {"step": log["step"], "epoch": log.get("epoch"), "loss": log.get("task_loss", log["loss"])}
        for log in state["log_history"]
        if "loss" in log
    ]
    final = results.get(key)
    lower_is_better = metric == "mse"
    best = (min if lower_is_better else max)(eval_history, key=lambda e: e[metric], default=None)

    importance = artifacts["importance"]
    environment = artifacts["run_environment"] or {}
    frozen = importance is not None and importance.get("frozen")
    metrics = {
        "task_name": task_name,
        "metric_name": metric,
        "final_metric": final,
        "best_metric": best[metric] if best else final,
        "best_step": best["step"] if best else None,
        "eval_history": eval_history,
        "train_loss_history": loss_history,
        # The run's training time over all its segments (a resumed run's `train_runtime` is its last segment's).
        "train_runtime": results.get("train_runtime_total"),
        "train_segments": results.get("train_segments"),
        "train_samples_per_second": results.get("train_samples_per_second"),
        "train_peak_memory_mb": results.get("train_peak_memory_mb"),
        "train_peak_memory_kind": results.get("train_peak_memory_kind"),
        "adapter": artifacts["adapter_summary"],
        # The importances the penalty used (for the shuffled control: permuted across matrices), its weights, and
        # the measured Fisher proxy behind them (never permuted).
        "importances": _per_matrix(importance, "importance") if frozen else None,
        "penalty_weights": _per_matrix(importance, "penalty_weight") if frozen else None,
        "fisher": _per_matrix(importance, "fisher") if frozen else None,
        "frozen_at_step": importance["frozen_at_step"] if frozen else None,
        "delta_weight_norms": artifacts["delta_weight_norms"],
        "eval_predictions": artifacts["eval_predictions"],
        "adapter_file_bytes": environment.get("adapter_file_bytes"),
        "hardware": environment.get("hardware"),
    }
    metrics.update(extra or {})
    return metrics


def _per_matrix(importance: dict, field: str) -> dict[str, float]:
    return {name: entry[field] for name, entry in importance["modules"].items()}


def group_key(metrics: dict) -> tuple[tuple[str, str], ...]:
    """The labels of a run's `metrics.json` on every axis but the seed's: runs with the same key form a cell."""
    return tuple((axis, label) for axis, label in metrics["labels"].items() if axis != SEED_AXIS)


def comparison_context(labels: dict[str, str], axis: str) -> tuple[tuple[str, str], ...]:
    """
    The labels of a run on every axis but the seed's and the compared `axis`: runs paired in a comparison share it
    (`(("task", "sst2"),)` for `lora` against `fisher_max` on SST-2).
    """
    return tuple((name, label) for name, label in labels.items() if name not in (axis, SEED_AXIS))


def group_name(key: tuple[tuple[str, str], ...]) -> str:
    """`sst2/fisher_max`: a cell's labels joined."""
    return "/".join(label for _, label in key)


def _read_json(path: str) -> Optional[Any]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_run_artifacts(run_dir: str) -> dict[str, Any]:
    """
    Reads back what a run wrote into its output directory, as written (no GLUE knowledge: the study derives its
    metrics from this).

    Args:
        run_dir (`str`): A `run_glue_fw.py --output_dir`.

    Returns:
        `dict`: `all_results` (`all_results.json`), `trainer_state` (`trainer_state.json`), `importance`
        (`fw_importance.json`, with `frozen_at_step`), `adapter_summary` (`adapter_summary.json`),
        `delta_weight_norms` (`delta_weight_norms.json`), `run_environment` (`run_environment.json`), each `None` when
        the run did not write it, and
        `eval_predictions`: the names of its `eval_predictions_{task}.tsv` files, sorted.
    """
    prefix, suffix = EVAL_PREDICTIONS_FILE.split("{task}")
    return {
        "all_results": _read_json(os.path.join(run_dir, ALL_RESULTS_FILE)),
        "trainer_state": _read_json(os.path.join(run_dir, TRAINER_STATE_FILE)),
        "importance": _read_json(os.path.join(run_dir, IMPORTANCE_FILE)),
        "adapter_summary": _read_json(os.path.join(run_dir, ADAPTER_SUMMARY_FILE)),
        "delta_weight_norms": _read_json(os.path.join(run_dir, DELTA_WEIGHT_NORMS_FILE)),
        "run_environment": _read_json(os.path.join(run_dir, RUN_ENVIRONMENT_FILE)),
        "eval_predictions": sorted(f for f in os.listdir(run_dir) if f.startswith(prefix) and f.endswith(suffix)),
    }


def read_run_metrics(run_dir: str) -> Optional[dict]:
    """The `metrics.json` of a run directory, or `None` if it has none or a damaged one (not a JSON object)."""
    try:
        with open(os.path.join(run_dir, METRICS_FILE), encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None
