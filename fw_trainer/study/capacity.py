"""
Did capacity move? For each run of the FW-LoRA family, Spearman's correlation across its adapted matrices between
how important the warm-up found each matrix and how much of its update the run kept, relative to LoRA:

    ρ = spearman(F_m, ‖ΔW_m‖_run / ‖ΔW_m‖_LoRA)      (the LoRA run of the same cell and seed)

If the penalty's Fisher weights move capacity, matrices with a large Fisher proxy keep more of their update than the
penalty lets the others keep: ρ > 0 for Fisher weights, and ρ near 0 for the uniform and shuffled controls. `F_m` is
the measured proxy, never permuted (`metrics.json`'s `fisher`; ranks, so the normalisation does not matter). Beside
it, the *applied* correlation uses what the penalty did: the negated penalty weight of each matrix (the less
penalised, the higher), permuted for the shuffled control and constant (undefined) for the uniform one.
"""

from collections import defaultdict
from typing import Optional

from .comparisons import paired_over_seeds
from .config import SEED_AXIS
from .run_metrics import comparison_context, group_key, group_name
from .statistics import paired_tests, spearman, summarize


# The method every run's update is compared with.
BASELINE_METHOD = "lora"


def _context(metrics: dict, axis: str) -> tuple:
    return comparison_context(metrics["labels"], axis), metrics["labels"].get(SEED_AXIS)


def capacity_correlations(runs: list[dict], axis: Optional[str]) -> list[dict]:
    """
    One row per finished run with frozen importances, `‖ΔW‖` per matrix and a LoRA run to compare with: the one
    whose labels differ only on `axis` (the study's comparison axis, `method`), with the same seed.

    Returns:
        `list[dict]`: `run`, `group` (its cell's name), `seed`, `baseline` (the LoRA run), `matrices` (how many were
        compared: those with a non-zero LoRA update), `measured_rho` and `applied_rho` (`None` where undefined).
    """
    axis = axis or "method"
    baselines = {
        _context(m, axis): m
        for m in runs
        if m["args"].get("method") == BASELINE_METHOD and m.get("delta_weight_norms")
    }
    rows = []
    for metrics in runs:
        fisher, norms = metrics.get("fisher"), metrics.get("delta_weight_norms")
        baseline = baselines.get(_context(metrics, axis))
        if not fisher or not norms or baseline is None:
            continue
        base = baseline["delta_weight_norms"]
        names = [name for name in fisher if name in norms and base.get(name, 0.0) > 0.0]
        kept = [norms[name] / base[name] for name in names]
        weights = metrics.get("penalty_weights")
        rows.append(
            {
                "run": metrics["run"],
                "group": group_name(group_key(metrics)),
                "labels": metrics["labels"],
                "seed": metrics["labels"].get(SEED_AXIS),
                "baseline": baseline["run"],
                "matrices": len(names),
                "measured_rho": spearman([fisher[name] for name in names], kept),
                "applied_rho": spearman([-weights[name] for name in names], kept) if weights else None,
            }
        )
    return rows


def _summarize_correlations(values: list[Optional[float]]) -> dict:
    # A mean correlation lies in [-1, 1]: the t interval of a few widely spread ones is clipped to it.
    summary = summarize([value for value in values if value is not None])
    if summary["ci_low"] is not None:
        summary.update(ci_low=max(-1.0, summary["ci_low"]), ci_high=min(1.0, summary["ci_high"]))
    return summary


def summarize_capacity(rows: list[dict]) -> list[dict]:
    """Per cell: the mean, standard deviation and t interval ([`summarize`], clipped to [-1, 1]) of both
    correlations over its seeds."""
    cells = defaultdict(list)
    for row in rows:
        cells[row["group"]].append(row)
    return [
        {
            "group": name,
            "seeds": [row["seed"] for row in members],
            "measured_rho": _summarize_correlations([row["measured_rho"] for row in members]),
            "applied_rho": _summarize_correlations([row["applied_rho"] for row in members]),
        }
        for name, members in cells.items()
    ]


def capacity_comparisons(rows: list[dict], pairs: list[tuple[str, str]], axis: Optional[str]) -> list[dict]:
    """
    The study's comparisons `(a, b)` on the measured correlation instead of the dev metric: in each group of the other
    axes, [`paired_tests`] of `ρ_a − ρ_b` over the seeds both have. A uniform penalty already lets the matrices with
    a large Fisher proxy keep more of their update (they carry a larger task gradient, which a uniform shrinkage
    opposes alike), so whether Fisher weights *move* capacity is whether their ρ exceeds the uniform control's.

    Returns:
        `list[dict]`: `group` (the other axes' labels), `a`, `b`, `seeds`, `a_values`, `b_values`, `difference`
        ([`summarize`] of `ρ_a − ρ_b`) and the [`paired_tests`] fields.
    """
    axis = axis or "method"
    by_cell = {}
    for row in rows:
        if row["measured_rho"] is not None:
            labels = row["labels"]
            by_cell[comparison_context(labels, axis), labels.get(axis), row["seed"]] = row["measured_rho"]
    comparisons = []
    for a, b, context, seeds in paired_over_seeds(by_cell, pairs):
        values_a, values_b = [by_cell[context, a, s] for s in seeds], [by_cell[context, b, s] for s in seeds]
        comparisons.append(
            {
                "group": dict(context),
                "a": a,
                "b": b,
                "seeds": seeds,
                "a_values": values_a,
                "b_values": values_b,
                "difference": summarize([x - y for x, y in zip(values_a, values_b)]),
                **paired_tests(values_a, values_b),
            }
        )
    return comparisons
