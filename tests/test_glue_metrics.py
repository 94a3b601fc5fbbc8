"""The GLUE metrics against independent computations written out here (confusion counts, moment formulas, ranks)."""

import math

import numpy as np
import pytest
from scipy.stats import ConstantInputWarning
from sklearn.exceptions import UndefinedMetricWarning

from fw_trainer.glue.metrics import GLUE_METRIC_NAMES, combined_score, glue_metric


ACCURACY_TASKS = ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans")


def brute_force_mcc(references, predictions) -> float:
    """Matthews correlation from the confusion matrix (Gorodkin's multi-class form); 0 when undefined, as sklearn."""
    classes = sorted(set(references) | set(predictions))
    confusion = np.array(
        [[sum(1 for r, p in zip(references, predictions) if r == t and p == q) for q in classes] for t in classes]
    )
    total, correct = confusion.sum(), np.trace(confusion)
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    numerator = correct * total - float(true_counts @ predicted_counts)
    denominator = math.sqrt(
        (total**2 - float(predicted_counts @ predicted_counts)) * (total**2 - float(true_counts @ true_counts))
    )
    return 0.0 if denominator == 0 else numerator / denominator


def brute_force_f1(references, predictions) -> float:
    tp = sum(1 for r, p in zip(references, predictions) if r == 1 and p == 1)
    fp = sum(1 for r, p in zip(references, predictions) if r != 1 and p == 1)
    fn = sum(1 for r, p in zip(references, predictions) if r == 1 and p != 1)
    return 2 * tp / (2 * tp + fp + fn)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their positions (what Spearman's rho is defined on)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def moment_pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / math.sqrt((dx * dx).sum() * (dy * dy).sum()))


def random_classes(seed: int, n: int, num_classes: int, agreement: float = 0.7):
    rng = np.random.default_rng(seed)
    references = rng.integers(0, num_classes, n)
    predictions = np.where(rng.random(n) < agreement, references, rng.integers(0, num_classes, n))
    return predictions, references


def test_the_known_tasks_and_their_metric_names():
    # evaluate's glue configurations, and what each returns.
    assert sorted(GLUE_METRIC_NAMES) == sorted(["cola", "stsb", "mrpc", "qqp", *ACCURACY_TASKS])
    assert glue_metric("cola", [0, 1], [0, 1]).keys() == {"matthews_correlation"}
    assert glue_metric("stsb", [0.0, 1.0, 2.5], [0.0, 1.5, 2.0]).keys() == {"pearson", "spearmanr"}
    for task in ("mrpc", "qqp"):
        assert list(glue_metric(task, [0, 1], [0, 1])) == ["accuracy", "f1"]
    for task in ACCURACY_TASKS:
        assert list(glue_metric(task, [0, 1], [0, 1])) == ["accuracy"]


@pytest.mark.parametrize("seed", range(5))
def test_cola_matches_brute_force_mcc(seed):
    predictions, references = random_classes(seed, 50 + 37 * seed, 2)
    result = glue_metric("cola", predictions, references)
    assert type(result["matthews_correlation"]) is float
    assert result["matthews_correlation"] == pytest.approx(brute_force_mcc(references.tolist(), predictions.tolist()))


def test_cola_edge_cases():
    references = [0, 1, 1, 0, 1]
    assert glue_metric("cola", references, references) == {"matthews_correlation": 1.0}
    assert glue_metric("cola", [1 - r for r in references], references)["matthews_correlation"] == pytest.approx(-1.0)
    # Constant predictions: the correlation is undefined; sklearn (and so evaluate) reports 0.0.
    for constant in (0, 1):
        assert glue_metric("cola", [constant] * 5, references) == {"matthews_correlation": 0.0}
        assert brute_force_mcc(references, [constant] * 5) == 0.0


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
@pytest.mark.parametrize("seed", range(4))
def test_accuracy_and_f1_match_confusion_counts(task, seed):
    predictions, references = random_classes(seed, 40 + 13 * seed, 2)
    result = glue_metric(task, predictions, references)
    assert result["accuracy"] == pytest.approx(np.mean(predictions == references))
    assert result["f1"] == pytest.approx(brute_force_f1(references.tolist(), predictions.tolist()))
    assert all(type(value) is float for value in result.values())


def test_f1_edge_cases():
    # F1 is of class 1: all-correct predictions of class 0 only leave it undefined, which sklearn reports as 0.0.
    with pytest.warns(UndefinedMetricWarning):
        assert glue_metric("mrpc", [0, 0, 0], [0, 0, 0]) == {"accuracy": 1.0, "f1": 0.0}
    assert glue_metric("qqp", [1, 1, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.5, "f1": pytest.approx(2 / 3)}


@pytest.mark.parametrize("task", ACCURACY_TASKS)
def test_accuracy_tasks(task):
    num_classes = 3 if task.startswith("mnli") or task == "hans" else 2
    predictions, references = random_classes(7, 101, num_classes)
    expected = sum(int(p == r) for p, r in zip(predictions, references)) / 101
    assert glue_metric(task, predictions, references) == {"accuracy": pytest.approx(expected)}
    assert type(glue_metric(task, predictions, references)["accuracy"]) is float


@pytest.mark.parametrize("seed", range(4))
def test_stsb_matches_moment_and_rank_formulas(seed):
    rng = np.random.default_rng(seed)
    references = np.round(rng.uniform(0, 5, 80) * 5) / 5  # STS-B-like scores, with ties
    predictions = references + rng.normal(0, 1.0, 80)
    result = glue_metric("stsb", predictions, references)
    # The metric works on float32 values, as evaluate's stsb features are float32.
    x, y = predictions.astype(np.float32), references.astype(np.float32)
    assert result["pearson"] == pytest.approx(moment_pearson(x, y), abs=1e-5)
    assert result["spearmanr"] == pytest.approx(moment_pearson(average_ranks(x), average_ranks(y)), abs=1e-6)
    assert all(type(value) is float for value in result.values())


def test_stsb_inputs_are_rounded_to_float32_first():
    rng = np.random.default_rng(0)
    predictions, references = rng.normal(size=30), rng.normal(size=30)
    float32 = glue_metric("stsb", predictions.astype(np.float32), references.astype(np.float32))
    assert glue_metric("stsb", predictions, references) == float32


def test_stsb_edge_cases():
    assert glue_metric("stsb", [1.0, 2.0, 3.0], [2.0, 4.0, 6.5])["spearmanr"] == pytest.approx(1.0)
    # A constant prediction has no correlation: scipy warns and gives NaN, as evaluate would.
    with pytest.warns(ConstantInputWarning):
        result = glue_metric("stsb", [3.0, 3.0, 3.0], [1.0, 2.0, 4.0])
    assert math.isnan(result["pearson"]) and math.isnan(result["spearmanr"])


def test_integral_floats_and_lists_are_accepted():
    assert glue_metric("rte", np.array([0.0, 1.0, 1.0]), [0, 1, 0]) == {"accuracy": pytest.approx(2 / 3)}
    assert glue_metric("sst2", (True, False), np.array([1, 0])) == {"accuracy": 1.0}


def test_combined_score():
    assert combined_score({"accuracy": 0.5, "f1": 0.75}) == 0.625
    assert combined_score({"pearson": 0.9, "spearmanr": 0.8}) == pytest.approx(0.85)
    assert combined_score({"accuracy": 0.9}) is None
    assert combined_score({}) is None
    result = glue_metric("mrpc", [1, 1, 0, 0], [1, 0, 0, 0])
    assert type(combined_score(result)) is float
    assert combined_score(result) == pytest.approx((0.75 + 2 / 3) / 2)


# Bad inputs.


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown GLUE metric task 'sst-2'") as error:
        glue_metric("sst-2", [0], [0])
    assert all(task in str(error.value) for task in GLUE_METRIC_NAMES)


def test_logits_instead_of_class_ids():
    logits = np.array([[0.1, 0.9], [0.8, 0.2]])
    with pytest.raises(ValueError, match="must be a 1-D array.*np.argmax\\(logits, axis=-1\\)"):
        glue_metric("sst2", logits, [1, 0])
    with pytest.raises(ValueError, match="np.squeeze\\(logits\\)"):
        glue_metric("stsb", np.ones((3, 1)), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="not integers"):
        glue_metric("cola", [0.2, 0.9], [0, 1])


def test_length_mismatch_and_empty_inputs():
    with pytest.raises(ValueError, match="got 3 predictions but 2 references"):
        glue_metric("rte", [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        glue_metric("rte", [], [])
