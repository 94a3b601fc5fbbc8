"""A run that diverged is not a success: the check of its final training loss and dev metrics."""

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn


class TrainingDivergedError(RuntimeError):
    """A run ended with a training loss or a dev metric that is not finite (NaN or infinite): its results mean nothing,
    though its files are kept for inspection. The message says what diverged, from which step, and what to try."""


def non_finite(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of `metrics` that are NaN or infinite."""
    return {
        name: value
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value)
    }


# The training losses a log may hold: the Trainer's (`loss`, from which `logging_nan_inf_filter`, on by default,
# drops non-finite steps) and FWLoraTrainer's own `task_loss`, which keeps them.
LOSS_KEYS = ("loss", "task_loss")


def first_non_finite_step(log_history: Sequence[dict[str, Any]]) -> Optional[int]:
    """The step of the first log with a training loss ([`LOSS_KEYS`]) that is not finite, or `None`."""
    for log in log_history:
        if non_finite({key: log[key] for key in LOSS_KEYS if key in log}):
            return log.get("step")
    return None


def training_divergence(
    train_metrics: dict[str, Any],
    log_history: Sequence[dict[str, Any]],
    advice: str,
    model: Optional[nn.Module] = None,
) -> Optional[TrainingDivergedError]:
    """
    The error to raise if training did not end with a finite loss (the run's mean training loss, or the last logged
    `loss` or `task_loss`), else `None`; returned rather than raised, so that the caller can keep the run's files
    first.

    Args:
        train_metrics (`dict`): `TrainOutput.metrics` (`train_loss` among them).
        log_history (`Sequence[dict]`): `TrainerState.log_history`.
        advice (`str`): What to try, for the message (the learning rate, clipping, precision in use).
        model (`nn.Module`, *optional*): The trained model: a trainable parameter that is not finite is a divergence
            too, also where no loss was logged after it (the Trainer's `loss` skips non-finite steps).

    Returns:
        [`TrainingDivergedError`] or `None`: The error says from which step the logged loss stopped being finite.
    """
    final = {"train_loss": train_metrics.get("train_loss")}
    for key in LOSS_KEYS:
        logged = [log[key] for log in log_history if key in log]
        if logged:
            final[f"the last logged {key}"] = logged[-1]
    bad = non_finite(final)
    if model is not None:
        broken = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if broken:
            bad[f"{len(broken)} trainable tensor(s), e.g. {broken[0]}"] = math.nan
    if bad:
        step = first_non_finite_step(log_history)
        since = f"not finite from step {step} on" if step is not None else "not finite"
        return TrainingDivergedError(
            f"The training diverged: {_listed(bad)}; the logged training loss is {since}. The run's files are kept "
            f"for inspection, but its results mean nothing. {advice}"
        )
    return None


def metrics_divergence(metrics: dict[str, Any], what: str, advice: str) -> Optional[TrainingDivergedError]:
    """The error to raise if a final metric (of `what`, e.g. "dev metrics") is not finite, naming them, else `None`."""
    bad = non_finite(metrics)
    if bad:
        return TrainingDivergedError(
            f"The {what} are not finite: {_listed(bad)}. The model diverged (or, for a correlation, predicts the same "
            "value for every example). The run's files are kept for inspection, but its results mean nothing. "
            f"{advice}"
        )
    return None


def divergence_advice(learning_rate: float, max_grad_norm: float, fp16: bool) -> str:
    """What to try after a divergence, given the run's learning rate, clipping and precision."""
    tries = [f"lower the learning rate (now {learning_rate:g})"]
    if not max_grad_norm:
        tries.append("clip gradients with --max_grad_norm (now off)")
    if fp16:
        tries.append("train in bf16 or fp32 instead of fp16")
    return "Try to " + ", or ".join(tries) + "."


def _listed(values: dict[str, float]) -> str:
    return ", ".join(f"{name} = {value}" for name, value in values.items())
