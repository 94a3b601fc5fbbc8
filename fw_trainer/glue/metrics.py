"""
The GLUE metrics of `evaluate.load("glue", task)`, computed locally with scikit-learn and scipy (no Hub download).
"""

from collections.abc import Callable, Sequence
from typing import Optional, Union

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef
from transformers import EvalPrediction

from ..errors import UsageError


# The configurations that evaluate's `glue` metric accepts, and the numbers each one returns.
GLUE_METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "stsb": ("pearson", "spearmanr"),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    **{
        task: ("accuracy",)
        for task in ("sst2", "mnli", "mnli_mismatched", "mnli_matched", "qnli", "rte", "wnli", "hans")
    },
}

ArrayLike = Union[np.ndarray, Sequence[float], Sequence[int]]
# The metric a study compares methods by, per task: the first of its metrics (MCC for CoLA, Pearson for STS-B).
PRIMARY_GLUE_METRIC = {task: names[0] for task, names in GLUE_METRIC_NAMES.items()}


def glue_metric(task_name: str, predictions: ArrayLike, references: ArrayLike) -> dict[str, float]:
    """
    The numbers of `evaluate.load("glue", task_name).compute(predictions=..., references=...)`, under the same names.

    As evaluate does, the inputs are first cast to the metric's feature types (int64 class ids; float32 scores for
    stsb, so that Pearson and Spearman are computed from the same float32 values), then: cola → Matthews correlation
    (`sklearn.metrics.matthews_corrcoef`); stsb → `scipy.stats.pearsonr` and `spearmanr`; mrpc, qqp → accuracy and
    binary F1 of class 1 (`sklearn.metrics.f1_score`); the other tasks → accuracy. Degenerate inputs give what those
    functions give: MCC 0.0 for constant predictions, F1 0.0 (with scikit-learn's warning) when class 1 never occurs,
    NaN correlations (with scipy's warning) for a constant input.

    Args:
        task_name (`str`): One of evaluate's glue configurations: `cola`, `stsb`, `mrpc`, `qqp`, `sst2`, `mnli`,
            `mnli_matched`, `mnli_mismatched`, `qnli`, `rte`, `wnli`, `hans`.
        predictions (`np.ndarray` or sequence): One prediction per example: class ids (e.g. `logits.argmax(-1)`), or
            scores for stsb.
        references (`np.ndarray` or sequence): The gold labels, same length.

    Returns:
        `dict[str, float]`: Metric name → value, as plain Python floats.

    Raises:
        `ValueError`: If the task is unknown, the inputs are not two 1-D arrays of the same non-zero length, or a
            classification input holds non-integer values (such as logits or probabilities).
    """
    if task_name not in GLUE_METRIC_NAMES:
        raise ValueError(
            f"Unknown GLUE metric task {task_name!r}. Known tasks (evaluate's glue configurations): "
            f"{', '.join(GLUE_METRIC_NAMES)}."
        )
    regression = task_name == "stsb"
    predictions = _as_metric_input(predictions, "predictions", task_name, regression)
    references = _as_metric_input(references, "references", task_name, regression)
    if len(predictions) != len(references):
        raise ValueError(
            f"GLUE {task_name}: got {len(predictions)} predictions but {len(references)} references. Pass one "
            "prediction per evaluated example."
        )
    if len(predictions) == 0:
        raise ValueError(f"GLUE {task_name}: no predictions to score. Evaluate on a non-empty dataset.")

    if task_name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
    if regression:
        return {
            "pearson": float(pearsonr(predictions, references)[0]),
            "spearmanr": float(spearmanr(predictions, references)[0]),
        }
    accuracy = float((predictions == references).mean())
    if task_name in ("mrpc", "qqp"):
        return {"accuracy": accuracy, "f1": float(f1_score(y_true=references, y_pred=predictions))}
    return {"accuracy": accuracy}


def combined_score(metrics: dict[str, float]) -> Optional[float]:
    """
    run_glue.py's `combined_score`: the mean of a task's metric values when it has more than one (mrpc and qqp:
    accuracy and F1; stsb: Pearson and Spearman), else `None`.

    Args:
        metrics (`dict[str, float]`): The output of [`glue_metric`].

    Returns:
        `float` or `None`: The mean of the values, or `None` for a single-metric task.
    """
    if len(metrics) <= 1:
        return None
    return float(np.mean(list(metrics.values())))


def _as_metric_input(values: ArrayLike, name: str, task_name: str, regression: bool) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        how = "np.squeeze(logits)" if regression else "np.argmax(logits, axis=-1)"
        raise ValueError(
            f"GLUE {task_name}: {name} must be a 1-D array with one value per example, got shape {array.shape}. "
            f"Reduce model outputs first, e.g. with `{how}`."
        )
    if regression:
        # evaluate's stsb features are float32: the scores are rounded to float32 before the correlations.
        return array.astype(np.float32)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ValueError(
                f"GLUE {task_name}: {name} must be class ids, but some values are not integers (logits or "
                "probabilities?). Pass `np.argmax(logits, axis=-1)`."
            )
    elif array.dtype.kind not in "iub" and array.size:
        raise ValueError(
            f"GLUE {task_name}: {name} must be class ids (integers), got an array of dtype {array.dtype}."
        )
    return array.astype(np.int64)


def predicted_labels(predictions: Union[np.ndarray, tuple[np.ndarray, ...]], is_regression: bool) -> np.ndarray:
    """The model's outputs as predictions: a label id per example (the arg max of the logits), or a score."""
    predictions = predictions[0] if isinstance(predictions, tuple) else predictions
    return np.squeeze(predictions) if is_regression else np.argmax(predictions, axis=1)


def metric_function(
    task_name: Optional[str], is_regression: bool, metric_name: Optional[str] = None, cache_dir: Optional[str] = None
) -> Callable[[EvalPrediction], dict[str, float]]:
    """
    The `compute_metrics` of the GLUE script, as run_glue.py's: a GLUE task's metrics (offline, [`glue_metric`], with
    `combined_score` where the task has several), a metric loaded with `evaluate` (`metric_name`, from the Hub), or
    for your own files accuracy or, for a regression, the mean squared error.

    Raises:
        `UsageError`: If `metric_name` cannot be loaded (unknown, or the Hub is out of reach).
    """
    hub_metric = None
    if metric_name is not None:
        import evaluate

        try:
            hub_metric = evaluate.load(metric_name, cache_dir=cache_dir)
        except Exception as error:  # unknown name, offline, ...: `evaluate` fails in many ways
            raise UsageError(
                f"Could not load the metric {metric_name!r} with `evaluate` ({type(error).__name__}: {error}). Check "
                "its name on the Hub, or leave out --metric_name to use the GLUE metrics computed offline."
            ) from error

    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        preds = predicted_labels(p.predictions, is_regression)
        if hub_metric is not None:
            result = hub_metric.compute(predictions=preds, references=p.label_ids)
        elif task_name is not None:
            result = glue_metric(task_name, preds, p.label_ids)
        elif is_regression:
            return {"mse": ((preds - p.label_ids) ** 2).mean().item()}
        else:
            return {"accuracy": (preds == p.label_ids).astype(np.float32).mean().item()}
        score = combined_score(result)
        if score is not None:
            result["combined_score"] = score
        return result

    return compute_metrics
