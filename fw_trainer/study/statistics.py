"""
The statistics of a study, from scipy: mean ± std with a t confidence interval over seeds, paired tests across seeds
(t-test, Wilcoxon signed-rank), McNemar's exact test on two runs' dev predictions, Holm–Bonferroni adjusted
p-values for a family of such tests, a percentile bootstrap interval of the mean paired difference, the smallest
difference the paired t-test detects with a given power (from the noncentral t, integrated), and Spearman's rank
correlation.
"""

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
from scipy import integrate, optimize, stats


def _no_variation(values: np.ndarray) -> bool:
    # Equal up to rounding: differences of metrics that moved by the same amount are rarely bit-identical.
    return bool(np.allclose(values, values[0], rtol=1e-9, atol=1e-12))


def summarize(values: Sequence[float], confidence: float = 0.95) -> dict:
    """
    Mean, sample standard deviation (ddof 1) and the Student-t confidence interval of the mean.

    Returns:
        `dict`: `n`, `mean`, `std`, `ci_low`, `ci_high` (`std` and the interval are `None` for fewer than two values;
        the interval is the mean itself when all values are equal).
    """
    array = np.asarray(values, dtype=np.float64)
    n = len(array)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci_low": None, "ci_high": None}
    mean = float(array.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci_low": None, "ci_high": None}
    std = float(array.std(ddof=1))
    half_width = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half_width, "ci_high": mean + half_width}


def paired_tests(a: Sequence[float], b: Sequence[float]) -> dict:
    """
    Two-sided paired tests of `a` against `b` (one value per seed, the same seeds in the same order).

    Returns:
        `dict`: `n`, `mean_difference` (mean of `a - b`), `t_statistic` and `t_pvalue` (`scipy.stats.ttest_rel`),
        `wilcoxon_statistic` and `wilcoxon_pvalue` (`scipy.stats.wilcoxon`, exact for small `n`; with three seeds its
        smallest possible p-value is 0.25). A test that is undefined (fewer than two pairs; no variation in the
        differences) has `None` values; identical results give p = 1.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"Paired tests need as many values on each side, got {len(a)} and {len(b)}.")
    differences = a - b
    result = {
        "n": len(a),
        "mean_difference": float(differences.mean()) if len(a) else None,
        "t_statistic": None,
        "t_pvalue": None,
        "wilcoxon_statistic": None,
        "wilcoxon_pvalue": None,
    }
    if len(a) < 2:
        return result
    if np.all(differences == 0):
        result.update(t_statistic=0.0, t_pvalue=1.0, wilcoxon_statistic=0.0, wilcoxon_pvalue=1.0)
        return result
    if _no_variation(differences):
        # t is ±∞ and p = 0 (JSON cannot hold the infinity).
        result.update(t_pvalue=0.0)
    else:
        t_test = stats.ttest_rel(a, b)
        result.update(t_statistic=float(t_test.statistic), t_pvalue=float(t_test.pvalue))
    wilcoxon = stats.wilcoxon(a, b)
    result.update(wilcoxon_statistic=float(wilcoxon.statistic), wilcoxon_pvalue=float(wilcoxon.pvalue))
    return result


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """
    McNemar's exact test: do two classifiers err on different dev examples more often one way than the other?

    Args:
        correct_a, correct_b: Per example, whether each classifier's prediction is right (same examples, same order).

    Returns:
        `dict`: `n`, `a_only_correct` and `b_only_correct` (the discordant pairs) and the two-sided `pvalue` of the
        exact binomial test of `a_only_correct` out of the discordant pairs against 1/2 (1 when there are none).
    """
    correct_a, correct_b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"McNemar needs the same examples on each side, got {len(correct_a)} and {len(correct_b)}.")
    a_only = int(np.sum(correct_a & ~correct_b))
    b_only = int(np.sum(~correct_a & correct_b))
    pvalue = 1.0 if a_only + b_only == 0 else float(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return {"n": len(correct_a), "a_only_correct": a_only, "b_only_correct": b_only, "pvalue": pvalue}


def bootstrap_mean_ci(
    differences: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> dict:
    """
    Percentile bootstrap confidence interval of the mean of paired differences (one per seed).

    Each resample draws `len(differences)` seeds with replacement (`numpy.random.default_rng(seed)`, one
    `integers(0, n, size=n)` draw per resample, in turn); the interval is the `(1 ± confidence) / 2` quantiles of the
    resampled means (`numpy.quantile`, linear interpolation). With few seeds it is narrower than the t interval of
    [`summarize`] (the bootstrap's spread is the plug-in one, `(n - 1) / n` of the variance) and coarse (five seeds
    allow only 126 distinct resamples): read it beside the t interval, not instead of it.

    Args:
        differences: The paired differences, e.g. a method's metric minus its baseline's, seed by seed.
        confidence: The coverage of the interval, in (0, 1).
        resamples: The number of bootstrap resamples.
        seed: The seed of the generator, so that the interval is reproducible.

    Returns:
        `dict`: `n`, `mean`, `ci_low`, `ci_high` and `resamples` (the mean is `None` without differences, the
        interval `None` for fewer than two).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` should lie in (0, 1), but the value passed is {confidence}.")
    if resamples < 1:
        raise ValueError(f"`resamples` should be at least 1, but the value passed is {resamples}.")
    array = np.asarray(differences, dtype=np.float64)
    n = len(array)
    result = {"n": n, "mean": float(array.mean()) if n else None, "ci_low": None, "ci_high": None}
    if n >= 2:
        indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
        low, high = np.quantile(array[indices].mean(axis=1), [(1 - confidence) / 2, (1 + confidence) / 2])
        result.update(ci_low=float(low), ci_high=float(high))
    return {**result, "resamples": resamples}


def _t_test_power(noncentrality: float, df: int, alpha: float) -> float:
    # The power of the two-sided one-sample t-test, P(|T| > t_{1-α/2, df}) for T = (Z + noncentrality) / U with
    # U = √(V / df), V ~ χ²_df: integrated over U's density (a chi scaled by 1 / √df). scipy's noncentral t
    # (`stats.nct`) answers NaN for some noncentralities at 1, 2 and 4 degrees of freedom, the studies' seed counts.
    critical = float(stats.t.ppf(1 - alpha / 2, df))
    scale = math.sqrt(df)

    def rejected(u: float) -> float:
        bound = critical * u
        density = scale * stats.chi.pdf(u * scale, df)
        return float((stats.norm.sf(bound - noncentrality) + stats.norm.cdf(-bound - noncentrality)) * density)

    return float(integrate.quad(rejected, 0.0, np.inf, limit=200)[0])


def minimum_detectable_difference(
    differences: Sequence[float], alpha: float = 0.05, power: float = 0.8
) -> Optional[float]:
    """
    The smallest true mean difference that a two-sided paired t-test at level `alpha` detects with probability
    `power`, for this many seeds and the spread of the differences observed.

    With `n` differences of sample standard deviation `s` (ddof 1), the t statistic is noncentral t with `n - 1`
    degrees of freedom and noncentrality `δ √n / s`; the returned `δ` is where that test's power equals `power`
    (solved with `scipy.optimize.brentq`, the power integrated numerically). It is larger than the normal approximation
    `(z_{1-α/2} + z_{power}) s / √n`: by about a third with five seeds (δ ≈ 1.68 s at α = 0.05 and power 0.8), by under
    1% with 200. A non-significant difference smaller than `δ` is "not detectable with this design", not "no
    difference".

    Args:
        differences: The paired differences, one per seed; only their number and standard deviation are used.
        alpha: The two-sided significance level, in (0, 1).
        power: The power wanted, in (`alpha`, 1).

    Returns:
        `Optional[float]`: `δ`, in the units of `differences`; `None` for fewer than two differences or when they do
        not vary (the design's noise is then unknown, not zero).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"`alpha` should lie in (0, 1), but the value passed is {alpha}.")
    if not alpha < power < 1.0:
        raise ValueError(f"`power` should lie in (alpha, 1) = ({alpha}, 1), but the value passed is {power}.")
    array = np.asarray(differences, dtype=np.float64)
    n = len(array)
    if n < 2 or _no_variation(array):
        return None
    df = n - 1
    # Bracket the root from the normal approximation, which undershoots: the power is alpha at 0 and grows with it.
    upper = float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))
    while _t_test_power(upper, df, alpha) < power:
        upper *= 2
    noncentrality = optimize.brentq(lambda nc: _t_test_power(nc, df, alpha) - power, 0.0, upper, xtol=1e-12)
    return float(noncentrality * array.std(ddof=1) / math.sqrt(n))


def holm_bonferroni(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """
    Holm–Bonferroni adjusted p-values: the step-down correction that controls the family-wise error rate.

    The `m` p-values of the family are sorted; the `k`-th smallest (from 0) is multiplied by `m - k`, capped at 1 and
    raised to the largest adjusted value before it, so that the adjusted p-values keep the order of the raw ones.
    Rejecting where the adjusted p-value is at most α is Holm's procedure at level α.

    Args:
        pvalues: One p-value per test. `None` marks a test that is undefined (see [`paired_tests`]): it is not part
            of the family, so it does not raise the others' multipliers.

    Returns:
        `list[Optional[float]]`: The adjusted p-values in the input order, `None` where the input is `None`.
    """
    family = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    for p, i in family:
        if not 0.0 <= p <= 1.0:  # also rejects NaN
            raise ValueError(f"A p-value must lie in [0, 1], but p-value {i} is {p}.")
    adjusted: list[Optional[float]] = [None] * len(pvalues)
    running_max = 0.0
    # Ties keep their input order; with the running maximum they get the same adjusted value whatever the order.
    for k, (p, i) in enumerate(sorted(family)):
        running_max = max(running_max, min(1.0, (len(family) - k) * p))
        adjusted[i] = running_max
    return adjusted


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """
    Spearman's rank correlation (`scipy.stats.spearmanr`, average ranks for ties), e.g. across adapted matrices
    between the importances `I_m` and `‖ΔW_m‖` of an FW-LoRA run divided by `‖ΔW_m‖` of the LoRA run with the same
    seed: did the weights move capacity to the matrices they favour?

    Returns:
        `Optional[float]`: The correlation in [-1, 1]; `None` where it is undefined (fewer than two pairs, or either
        side constant).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"Spearman's correlation needs as many values on each side, got {len(x)} and {len(y)}.")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        # scipy would answer NaN, which reads as "undefined" rather than as the broken input it is.
        raise ValueError("Spearman's correlation needs finite values, but the input holds NaN or infinity.")
    # Exactly constant, not up to rounding: distinct values have distinct ranks however close they are.
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    return float(stats.spearmanr(x, y).statistic)
