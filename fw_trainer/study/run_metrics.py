"""
`metrics.json`: everything the study aggregation needs from one finished `run_glue_fw.py` output directory.
"""

import json
import os
import tempfile
from typing import Any, Optional

from ..glue.metrics import PRIMARY_GLUE_METRIC


METRICS_FILE = "metrics.json"

# The number a GLUE paper reports per task (the first of several): what studies compare and test.


def primary_metric(task_name: Optional[str], eval_results: dict[str, Any]) -> str:
    """The metric to compare for a task (`matthews_correlation` for CoLA, `pearson` for STS-B, else `accuracy`); for a
    custom dataset, `accuracy` or `mse`, whichever the run reports."""
    if task_name in PRIMARY_GLUE_METRIC:
        return PRIMARY_GLUE_METRIC[task_name]
    for name in ("accuracy", "mse"):
        if f"eval_{name}" in eval_results:
            return name
    raise ValueError(f"Cannot tell which metric to compare: the eval results hold {sorted(eval_results)}.")


def _read_json(path: str) -> Optional[Any]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def collect_run_metrics(run_dir: str, task_name: Optional[str], extra: Optional[dict[str, Any]] = None) -> dict:
    """
    Summarises a finished run directory.

    Args:
        run_dir (`str`): A `run_glue_fw.py --output_dir` holding `all_results.json` and `trainer_state.json`.
        task_name (`str`, *optional*): The GLUE task (picks the primary metric); `None` for a custom dataset.
        extra (`dict`, *optional*): Merged into the result (the sweep adds the run's name, labels and arguments).

    Returns:
        `dict`: `metric_name`, `final_metric` (the last evaluation), `best_metric` and `best_step` (the best of the
        evaluations during training; an optimistic number, since dev selects and scores), `eval_history` and
        `train_loss_history` (step, epoch, value), `train_runtime`, `train_samples_per_second`,
        `train_peak_memory_mb` and its kind, the adapter summary, the frozen FW-LoRA importances (or `None`), the
        end-of-training `‖ΔW‖_F` per matrix (or `None`) and the file names of the dev predictions.

    Raises:
        `FileNotFoundError`: If the run has not finished (no `all_results.json`).
    """
    results = _read_json(os.path.join(run_dir, "all_results.json"))
    if results is None:
        raise FileNotFoundError(f"{run_dir} holds no all_results.json: the run has not finished.")
    state = _read_json(os.path.join(run_dir, "trainer_state.json")) or {"log_history": []}
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

    importance = _read_json(os.path.join(run_dir, "fw_importance.json"))
    metrics = {
        "task_name": task_name,
        "metric_name": metric,
        "final_metric": final,
        "best_metric": best[metric] if best else final,
        "best_step": best["step"] if best else None,
        "eval_history": eval_history,
        "train_loss_history": loss_history,
        "train_runtime": results.get("train_runtime"),
        "train_samples_per_second": results.get("train_samples_per_second"),
        "train_peak_memory_mb": results.get("train_peak_memory_mb"),
        "train_peak_memory_kind": results.get("train_peak_memory_kind"),
        "adapter": _read_json(os.path.join(run_dir, "adapter_summary.json")),
        "importances": (
            {name: entry["importance"] for name, entry in importance["modules"].items()}
            if importance and importance.get("frozen")
            else None
        ),
        "delta_weight_norms": _read_json(os.path.join(run_dir, "delta_weight_norms.json")),
        "eval_predictions": sorted(f for f in os.listdir(run_dir) if f.startswith("eval_predictions_")),
    }
    metrics.update(extra or {})
    return metrics


def write_json_atomic(path: str, data: Any) -> None:
    """Writes JSON to a temporary file beside `path`, then renames it: readers see the old file or the whole new one,
    never half of it, even if the process is killed mid-write."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".tmp-", suffix=".json", delete=False) as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)
