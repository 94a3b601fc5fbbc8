"""Pure tensor functions for the Fisher proxy: its moving average and the normalised importances."""

import warnings

import torch

from .arguments import check_option, default_of


def ema_update(
    ema: torch.Tensor, num_updates: torch.Tensor, step_value: torch.Tensor, valid: torch.Tensor, decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    One optimizer step of the exponential moving average `F ← α F + (1 − α) g`, started from zero and read back with
    [`bias_corrected`]; a step with no finite micro-batch (`valid` false) leaves the average untouched.

    Everything stays on the device: no host synchronisation.

    Args:
        ema (`torch.Tensor`): Raw (not bias-corrected) average, shape `(M,)`.
        num_updates (`torch.Tensor`): Number of steps folded in so far, a 0-d tensor.
        step_value (`torch.Tensor`): The step's statistic `g`, shape `(M,)`.
        valid (`torch.Tensor`): 0-d boolean tensor, whether `step_value` is to be used.
        decay (`float`): The decay α.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: The new `(ema, num_updates)`.
    """
    updated = decay * ema + (1.0 - decay) * step_value
    return torch.where(valid, updated, ema), num_updates + valid.to(num_updates.dtype)


def running_mean_update(
    mean: torch.Tensor, num_updates: torch.Tensor, step_value: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    One step of the plain running mean `F ← F + (g − F) / (t + 1)` (IW-LoRA's average); a step with no finite
    micro-batch (`valid` false) leaves it untouched. No host synchronisation.
    """
    count = num_updates + valid.to(num_updates.dtype)
    updated = mean + (step_value - mean) / count.clamp_min(1.0)
    return torch.where(valid, updated, mean), count


def bias_corrected(ema: torch.Tensor, num_updates: torch.Tensor, decay: float) -> torch.Tensor:
    """
    The Adam-style bias-corrected average `F = ema / (1 − α^t)`: a proper weighted mean of the `t` statistics
    folded in so far, whose weights sum to one. Zero before the first update.
    """
    correction = 1.0 - torch.pow(torch.as_tensor(decay, dtype=ema.dtype, device=ema.device), num_updates)
    return torch.where(num_updates > 0, ema / correction.clamp_min(torch.finfo(ema.dtype).tiny), torch.zeros_like(ema))


def normalize_importances(fisher: torch.Tensor, normalization: str = default_of("fw_normalization")) -> torch.Tensor:
    """
    Normalised importances `I` of the adapted matrices from their Fisher proxies `F`.

    Args:
        fisher (`torch.Tensor`): Non-negative Fisher proxies, shape `(M,)`.
        normalization (`str`, *optional*, defaults to `"sum"`):
            `"sum"`: `I = F / ΣF` (the paper's; with many matrices every `I` is small and `1 − I ≈ 1`).
            `"max"`: `I = F / max F`, which spreads the importances over [0, 1].

    Returns:
        `torch.Tensor`: Importances of shape `(M,)`. If `F` is all zero (or not finite), every matrix gets the same
        importance (`1 / M` for `"sum"`, `1` for `"max"`) and a warning is issued.
    """
    check_option("fw_normalization", normalization, argument="normalization")
    fisher = fisher.detach().float()
    denominator = fisher.sum() if normalization == "sum" else fisher.max()
    if not torch.isfinite(denominator) or denominator <= 0:
        warnings.warn(
            "The Fisher proxy is zero (or not finite) for every adapted matrix: no gradient reached the adapted "
            "layers during the warm-up. Falling back to uniform importances, i.e. a plain uniform L2 penalty.",
            stacklevel=2,
        )
        uniform = 1.0 / fisher.numel() if normalization == "sum" else 1.0
        return torch.full_like(fisher, uniform)
    return fisher / denominator


def penalty_weights(importances: torch.Tensor, power: float = default_of("fw_power")) -> torch.Tensor:
    """The penalty weights `(1 − I_m)^β` of the importances `I`; β = 1 is FW-LoRA's form, β = 0 a uniform penalty."""
    check_option("fw_power", power, argument="power")
    return (1.0 - importances).pow(power)


def exempt_largest(weights: torch.Tensor, fisher: torch.Tensor, count: int) -> torch.Tensor:
    """
    The penalty weights with weight 0 on the `count` matrices of largest measured Fisher proxy `F` (the top-k exempt
    control); ties go to the first matrix in model order. No host synchronisation.

    Args:
        weights (`torch.Tensor`): Penalty weights, shape `(M,)`.
        fisher (`torch.Tensor`): The measured (unpermuted) Fisher proxies, shape `(M,)`, on the device of `weights`.
        count (`int`): How many matrices to exempt, `0 <= count < M`.
    """
    count = check_option("fw_exempt_top", count, argument="count")
    if count == 0:
        return weights
    largest = torch.argsort(fisher, descending=True, stable=True)[:count]
    return weights.index_fill(0, largest, 0.0)


def shuffled(importances: torch.Tensor, seed: int) -> torch.Tensor:
    """The importances permuted across matrices by a generator seeded with `seed` (on the CPU, so that the permutation
    is the same on every device): the shuffled control, the same values assigned at random."""
    seed = check_option("fw_shuffle_seed", seed, argument="seed")
    permutation = torch.randperm(importances.numel(), generator=torch.Generator().manual_seed(seed))
    return importances[permutation.to(importances.device)]
