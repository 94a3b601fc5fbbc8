"""The moving average and the normalisation against plain Python loops."""

import pytest
import torch

from fw_trainer import bias_corrected, ema_update, normalize_importances


def test_ema_with_bias_correction_matches_a_python_loop():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(7, 5, generator=generator) * 10
    valid = [True, True, False, True, True, False, True]
    decay = 0.98

    ema, count = torch.zeros(5), torch.zeros(())
    for value, ok in zip(values, valid):
        ema, count = ema_update(ema, count, value, torch.tensor(ok), decay)

    # Weighted mean of the valid steps, weights decay^(age) normalised to one.
    kept = [value for value, ok in zip(values, valid) if ok]
    weights = [(1 - decay) * decay ** (len(kept) - 1 - i) for i in range(len(kept))]
    expected = sum(w * v for w, v in zip(weights, kept)) / sum(weights)
    assert count.item() == len(kept)
    torch.testing.assert_close(bias_corrected(ema, count, decay), expected, rtol=1e-5, atol=0)


def test_bias_corrected_is_zero_before_any_update():
    assert torch.equal(bias_corrected(torch.zeros(3), torch.zeros(()), 0.9), torch.zeros(3))


def test_sum_and_max_normalisation():
    fisher = torch.tensor([1.0, 3.0, 4.0])
    torch.testing.assert_close(normalize_importances(fisher, "sum"), torch.tensor([0.125, 0.375, 0.5]))
    torch.testing.assert_close(normalize_importances(fisher, "max"), torch.tensor([0.25, 0.75, 1.0]))


@pytest.mark.parametrize("normalization, uniform", [("sum", 0.25), ("max", 1.0)])
def test_all_zero_fisher_falls_back_to_uniform(normalization, uniform):
    with pytest.warns(UserWarning, match="uniform importances"):
        importances = normalize_importances(torch.zeros(4), normalization)
    assert torch.equal(importances, torch.full((4,), uniform))


def test_unknown_normalisation_is_rejected():
    with pytest.raises(ValueError, match="`normalization` should be"):
        normalize_importances(torch.ones(2), "softmax")
