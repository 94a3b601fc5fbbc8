"""The study statistics against values computed by hand (t quantiles and binomial sums from tables, Holm's steps)."""

import math

import numpy as np
import pytest
from scipy import integrate, stats

from fw_trainer.study.statistics import (
    bootstrap_mean_ci,
    holm_bonferroni,
    mcnemar,
    minimum_detectable_difference,
    paired_tests,
    spearman,
    summarize,
)


def test_summary_mean_std_and_t_interval():
    summary = summarize([0.80, 0.83, 0.86])
    # mean 0.83; std = sqrt((0.03² + 0 + 0.03²) / 2) = 0.03; t_{0.975, 2} = 4.302653
    half_width = 4.302653 * 0.03 / math.sqrt(3)
    assert summary["n"] == 3
    assert summary["mean"] == pytest.approx(0.83)
    assert summary["std"] == pytest.approx(0.03)
    assert summary["ci_low"] == pytest.approx(0.83 - half_width, rel=1e-6)
    assert summary["ci_high"] == pytest.approx(0.83 + half_width, rel=1e-6)


def test_summary_of_one_and_of_none():
    assert summarize([0.5]) == {"n": 1, "mean": 0.5, "std": None, "ci_low": None, "ci_high": None}
    assert summarize([])["mean"] is None


def test_paired_t_test_and_wilcoxon_by_hand():
    a, b = [0.85, 0.86, 0.84, 0.88], [0.84, 0.83, 0.84, 0.85]
    result = paired_tests(a, b)
    differences = [0.01, 0.03, 0.00, 0.03]
    mean = sum(differences) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3)
    t = mean / (sd / 2)
    assert result["mean_difference"] == pytest.approx(mean)
    assert result["t_statistic"] == pytest.approx(t)
    # Student's t with 3 degrees of freedom has a closed-form CDF: two-sided p = 1 − (2/π)(x / (1 + x²) + atan x),
    # x = t / √3.
    x = t / math.sqrt(3)
    assert result["t_pvalue"] == pytest.approx(1 - 2 / math.pi * (x / (1 + x * x) + math.atan(x)), rel=1e-9)
    # Wilcoxon drops the zero difference; the ranks of 0.01, 0.03, 0.03 are 1, 2.5, 2.5, all positive: W- = 0.
    assert result["wilcoxon_statistic"] == 0.0
    assert result["wilcoxon_pvalue"] == pytest.approx(0.25)  # the smallest two-sided p with three non-zero pairs


def test_wilcoxon_exact_p_with_six_seeds():
    # All six differences positive and distinct: the exact two-sided p is 2 / 2^6.
    result = paired_tests([1, 2, 3, 4, 5, 6], [0.9, 1.7, 2.6, 3.5, 4.4, 5.3])
    assert result["wilcoxon_pvalue"] == pytest.approx(2 / 64)


def test_identical_and_constant_differences():
    same = paired_tests([0.8, 0.9], [0.8, 0.9])
    assert same["t_pvalue"] == 1.0 and same["wilcoxon_pvalue"] == 1.0 and same["mean_difference"] == 0.0
    shifted = paired_tests([0.8, 0.9, 0.7], [0.7, 0.8, 0.6])
    assert shifted["t_statistic"] is None and shifted["t_pvalue"] == 0.0
    assert paired_tests([0.8], [0.7])["t_pvalue"] is None
    with pytest.raises(ValueError, match="as many values"):
        paired_tests([1, 2], [1])


def test_mcnemar_exact_binomial_by_hand():
    # 8 examples only A gets right, 2 only B, 5 both right, 3 both wrong.
    correct_a = [1] * 8 + [0] * 2 + [1] * 5 + [0] * 3
    correct_b = [0] * 8 + [1] * 2 + [1] * 5 + [0] * 3
    result = mcnemar(correct_a, correct_b)
    assert (result["n"], result["a_only_correct"], result["b_only_correct"]) == (18, 8, 2)
    # P = 2 · P(X ≤ 2), X ~ Binomial(10, 1/2) = 2 · (1 + 10 + 45) / 1024
    assert result["pvalue"] == pytest.approx(2 * 56 / 1024)
    assert mcnemar([1, 0, 1], [1, 0, 1])["pvalue"] == 1.0


def test_bootstrap_against_a_hand_loop_with_the_same_generator():
    differences = [0.012, -0.004, 0.021, 0.008, 0.015]
    result = bootstrap_mean_ci(differences, confidence=0.9, resamples=2000, seed=7)
    # The same draws, one resample at a time, and the quantiles by sorting and interpolating between neighbours.
    rng = np.random.default_rng(7)
    means = sorted(sum(differences[i] for i in rng.integers(0, 5, size=5)) / 5 for _ in range(2000))

    def quantile(q):
        position = q * (len(means) - 1)
        below = math.floor(position)
        return means[below] + (position - below) * (means[below + 1] - means[below])

    assert result["n"] == 5 and result["resamples"] == 2000
    assert result["mean"] == pytest.approx(sum(differences) / 5)
    assert result["ci_low"] == pytest.approx(quantile(0.05), abs=1e-12)
    assert result["ci_high"] == pytest.approx(quantile(0.95), abs=1e-12)
    assert result["ci_low"] < result["mean"] < result["ci_high"]
    assert bootstrap_mean_ci(differences, confidence=0.9, resamples=2000, seed=7) == result
    assert bootstrap_mean_ci(differences, confidence=0.9, resamples=2000, seed=8) != result


def test_bootstrap_of_equal_differences_has_zero_width_and_of_one_none():
    result = bootstrap_mean_ci([0.01] * 5)
    assert result["ci_low"] == pytest.approx(0.01) and result["ci_high"] == pytest.approx(0.01)
    assert bootstrap_mean_ci([0.02]) == {"n": 1, "mean": 0.02, "ci_low": None, "ci_high": None, "resamples": 10_000}
    assert bootstrap_mean_ci([])["mean"] is None
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean_ci([0.1, 0.2], confidence=95)


def test_minimum_detectable_difference_has_the_power_asked_for():
    differences = [0.012, -0.004, 0.021, 0.008, 0.015]
    n, s = 5, float(np.std(differences, ddof=1))
    delta = minimum_detectable_difference(differences)
    critical = 2.776445  # t_{0.975, 4}, from a table
    # The power written out without the noncentral t: T = (Z + λ) / √(V / 4), V ~ χ²₄, so
    # P(|T| > c) = ∫ P(|Z + λ| > c √(v / 4)) f_χ²₄(v) dv.
    noncentrality = delta * math.sqrt(n) / s

    def rejection(v):
        bound = critical * math.sqrt(v / 4)
        return (stats.norm.sf(bound - noncentrality) + stats.norm.cdf(-bound - noncentrality)) * stats.chi2.pdf(v, 4)

    assert integrate.quad(rejection, 0, np.inf)[0] == pytest.approx(0.8, abs=1e-5)
    # And by simulation: seeds whose differences have mean δ and standard deviation s, tested 20,000 times.
    samples = np.random.default_rng(0).normal(delta, s, size=(20_000, n))
    t = samples.mean(axis=1) / (samples.std(axis=1, ddof=1) / math.sqrt(n))
    assert np.mean(np.abs(t) > critical) == pytest.approx(0.8, abs=0.01)
    # The normal approximation (z_{0.975} + z_{0.8}) s / √n undershoots with five seeds, and not by much with 200.
    normal = (1.959964 + 0.841621) * s / math.sqrt(n)
    assert normal < delta < 1.5 * normal
    many = np.tile(differences, 40)
    normal_many = (1.959964 + 0.841621) * float(np.std(many, ddof=1)) / math.sqrt(200)
    assert normal_many < minimum_detectable_difference(many) < 1.01 * normal_many


@pytest.mark.parametrize("differences", [[0.01, 0.03], [0.01, 0.03, 0.02], [0.01, 0.03, 0.02, -0.01]])
def test_minimum_detectable_difference_with_two_to_four_seeds(differences):
    """A partial study has few seeds per comparison: scipy's noncentral t answers NaN on the way to these roots
    (e.g. at noncentrality 11.2 with 1 and 2 degrees of freedom), which stopped the aggregation with a ValueError."""
    n, s = len(differences), float(np.std(differences, ddof=1))
    delta = minimum_detectable_difference(differences)
    critical = stats.t.ppf(0.975, n - 1)
    samples = np.random.default_rng(1).normal(delta, s, size=(100_000, n))
    t = samples.mean(axis=1) / (samples.std(axis=1, ddof=1) / math.sqrt(n))
    assert np.mean(np.abs(t) > critical) == pytest.approx(0.8, abs=0.006)


def test_minimum_detectable_difference_is_undefined_without_spread():
    assert minimum_detectable_difference([0.01]) is None
    assert minimum_detectable_difference([0.1 - 0.09, 0.2 - 0.19, 0.3 - 0.29]) is None  # equal up to rounding
    with pytest.raises(ValueError, match="power"):
        minimum_detectable_difference([0.01, 0.02], alpha=0.05, power=0.01)


@pytest.mark.parametrize(
    "pvalues, expected",
    [
        # Sorted: 0.005 × 4 = 0.02, 0.01 × 3 = 0.03, 0.03 × 2 = 0.06, 0.04 × 1 = 0.04 → max(0.06, 0.04) = 0.06.
        ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),
        # Ties: 0.02 × 3 = 0.06, then 0.02 × 2 = 0.04 → 0.06; 0.5 × 1 = 0.5.
        ([0.02, 0.5, 0.02], [0.06, 0.5, 0.06]),
        # Capped at 1: 0.3 × 3 = 0.9, 0.4 × 2 = 0.8 → 0.9, 0.9 × 1 = 0.9.
        ([0.9, 0.3, 0.4], [0.9, 0.9, 0.9]),
        ([0.6, 0.7], [1.0, 1.0]),
        ([0.03], [0.03]),
        # An undefined test is left out of the family: two tests, so 0.01 × 2 and 0.04 × 1 → 0.04.
        ([0.04, None, 0.01], [0.04, None, 0.02]),
        ([None, None], [None, None]),
        ([], []),
    ],
)
def test_holm_bonferroni_by_hand(pvalues, expected):
    adjusted = holm_bonferroni(pvalues)
    assert [a is None for a in adjusted] == [e is None for e in expected]
    assert [a for a in adjusted if a is not None] == pytest.approx([e for e in expected if e is not None])


@pytest.mark.parametrize("pvalue", [-0.1, 1.5, float("nan")])
def test_holm_bonferroni_rejects_what_is_not_a_p_value(pvalue):
    with pytest.raises(ValueError, match="p-value 1 is"):
        holm_bonferroni([0.01, pvalue])


def test_spearman_by_hand():
    # Ranks 1..5 against 2, 1, 4, 3, 5: Σd² = 4, ρ = 1 − 6 · 4 / (5 · (25 − 1)) = 0.8.
    assert spearman([0.1, 0.2, 0.3, 0.4, 0.5], [2.0, 1.0, 4.0, 3.0, 5.0]) == pytest.approx(0.8)
    # A tie takes the average rank, and ρ is Pearson's r of the ranks: x ranks 1, 2.5, 2.5, 4 and y ranks 1, 3, 2, 4
    # deviate from 2.5 by (−1.5, 0, 0, 1.5) and (−1.5, 0.5, −0.5, 1.5): r = 4.5 / √(4.5 · 5) = √0.9.
    assert spearman([10, 20, 20, 40], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    assert spearman([3, 2, 1], [1, 5, 9]) == pytest.approx(-1.0)


def test_spearman_undefined_and_invalid():
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    assert spearman([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]) is None
    assert spearman([1.0], [2.0]) is None
    with pytest.raises(ValueError, match="as many values"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        spearman([1, 2, float("inf")], [1, 2, 3])
