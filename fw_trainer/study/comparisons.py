"""
The study's pre-registered comparisons: each pair `(a, b)` of its `comparisons`, in each group of the other axes,
paired over the seeds both sides finished. One family per study file: the Holm–Bonferroni adjustment runs over every
comparison the file lists, in every group.
"""

import os
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np

from ..glue.run_outputs import EVAL_PREDICTIONS_FILE
from ..glue.tsv_layout import GLUE_LABEL_NAMES
from .config import SEED_AXIS, StudyConfig
from .run_metrics import comparison_context
from .statistics import (
    bootstrap_mean_ci,
    holm_bonferroni,
    mcnemar,
    minimum_detectable_difference,
    paired_tests,
    summarize,
)


# The level of the primary decision: the Holm-adjusted paired t-test (results/fisher_controls/README.md).
ALPHA = 0.05
# Power for the smallest difference the design detects, reported beside every comparison.
POWER = 0.8


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


def paired_over_seeds(
    by_cell: dict[tuple, Any], pairs: list[tuple[str, str]]
) -> Iterator[tuple[str, str, tuple, list[str]]]:
    """
    The pairings of a study's comparisons: for each pair `(a, b)` and each group of the other axes (in first-seen
    order), the seeds both `a` and `b` have there.

    Args:
        by_cell (`dict`): `(group of the other axes, label on the compared axis, seed)` → anything.
        pairs (`list`): The comparisons `(a, b)`.

    Yields:
        `(a, b, group, seeds)` for every pair and group with at least one seed on both sides.
    """
    contexts = list(dict.fromkeys(context for context, _, _ in by_cell))
    for a, b in pairs:
        for context in contexts:
            seeds = [s for (c, label, s) in by_cell if c == context and label == a and (c, b, s) in by_cell]
            if seeds:
                yield a, b, context, seeds


def _verdict(test: dict) -> str:
    """What the primary test says, in words: a difference at the family-wise level, or not detectable."""
    p = test["t_pvalue_holm"]
    if p is None:
        return "undefined (fewer than two seeds, or no spread)"
    if p <= ALPHA:
        return f"{test['a']} {'higher' if test['mean_difference'] > 0 else 'lower'} (Holm p ≤ {ALPHA})"
    return "no significant difference"


def significance_tests(runs: list[dict], config: StudyConfig) -> list[dict]:
    """
    For each comparison `(a, b)` of the study and each group of the other axes, on the final dev metric over the
    seeds both ran: the paired t-test and Wilcoxon signed-rank test with their Holm–Bonferroni adjusted p-values
    (over the study's whole family), the mean paired difference with its t and percentile-bootstrap 95 % intervals,
    the smallest difference the design detects with 80 % power, and McNemar's test on the dev predictions per seed.

    Returns:
        `list[dict]`: One entry per comparison and group: `group`, `axis`, `a`, `b`, `metric_name`, `seeds`,
        `a_values`, `b_values`, the [`paired_tests`] fields, `t_pvalue_holm`, `wilcoxon_pvalue_holm`, `difference`
        ([`summarize`] of `a − b`), `bootstrap` ([`bootstrap_mean_ci`]), `minimum_detectable_difference`, `verdict`
        and `mcnemar` (one [`mcnemar`] per seed with predictions on both sides).
    """
    axis = config.comparison_axis
    by_cell = {(comparison_context(m["labels"], axis), m["labels"][axis], m["labels"].get(SEED_AXIS)): m for m in runs}
    tests = []
    for a, b, context, seeds in paired_over_seeds(by_cell, config.comparison_pairs):
        run_a = [by_cell[context, a, s] for s in seeds]
        run_b = [by_cell[context, b, s] for s in seeds]
        values_a, values_b = [m["final_metric"] for m in run_a], [m["final_metric"] for m in run_b]
        entry = {
            "group": dict(context),
            "axis": axis,
            "a": a,
            "b": b,
            "metric_name": run_a[0]["metric_name"],
            **paired_comparison(seeds, values_a, values_b),
            "mcnemar": [],
        }
        for seed, one, two in zip(seeds, run_a, run_b):
            correct_one, correct_two = _correct(one), _correct(two)
            if correct_one is not None and correct_two is not None:
                entry["mcnemar"].append({"seed": seed, **mcnemar(correct_one, correct_two)})
        tests.append(entry)
    return adjust_family(tests)


def paired_comparison(seeds: list[str], values_a: list[float], values_b: list[float]) -> dict[str, Any]:
    """The statistics of one comparison on the final dev metric, paired over `seeds`: the [`paired_tests`] fields,
    `difference` ([`summarize`] of `a − b`), `bootstrap` ([`bootstrap_mean_ci`]) and
    `minimum_detectable_difference`."""
    differences = np.subtract(values_a, values_b)
    return {
        "compared": "final dev metric",
        "seeds": seeds,
        "a_values": values_a,
        "b_values": values_b,
        **paired_tests(values_a, values_b),
        "difference": summarize(differences),
        "bootstrap": bootstrap_mean_ci(differences),
        "minimum_detectable_difference": minimum_detectable_difference(differences, ALPHA, POWER),
    }


def adjust_family(tests: list[dict]) -> list[dict]:
    """Adds `t_pvalue_holm` and `wilcoxon_pvalue_holm` (Holm–Bonferroni over all of `tests`, one family) and the
    `verdict` to each comparison; returns `tests`."""
    for key in ("t_pvalue", "wilcoxon_pvalue"):
        for test, adjusted in zip(tests, holm_bonferroni([test[key] for test in tests])):
            test[f"{key}_holm"] = adjusted
    for test in tests:
        test["verdict"] = _verdict(test)
    return tests
