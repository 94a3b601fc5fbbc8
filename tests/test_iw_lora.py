"""IW-LoRA's three options and its preset, each against an independent computation."""

import pytest
import torch
from conftest import SequentialFWLoraTrainer, TokenDataset, lora_model, rows, training_args
from references import brute_force_penalty, reference_sq_grad_norms
from transformers import TrainerCallback

from fw_trainer import FWLoraArguments, find_adapted_matrices


def test_preset_sets_every_option_and_yields_to_explicit_ones():
    preset = FWLoraArguments(method="iw_lora")
    assert (preset.fw_statistic, preset.fw_average, preset.fw_warmup_mode, preset.fw_warmup_steps) == (
        "norm",
        "mean",
        "calibrate",
        200,
    )
    assert preset.fw_power == 1.0
    fw = FWLoraArguments(method="fw_lora")
    assert (fw.fw_statistic, fw.fw_average, fw.fw_warmup_mode, fw.fw_warmup_steps) == ("sq_norm", "ema", "train", 500)
    custom = FWLoraArguments(method="iw_lora", fw_average="ema", fw_warmup_steps=50)
    assert (custom.fw_statistic, custom.fw_average, custom.fw_warmup_steps) == ("norm", "ema", 50)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fw_statistic": "abs"}, "`fw_statistic` should be one of"),
        ({"fw_average": "median"}, "`fw_average` should be one of"),
        ({"fw_warmup_mode": "frozen"}, "`fw_warmup_mode` should be one of"),
        ({"fw_power": -1.0}, "`fw_power` should be greater than or equal to 0"),
    ],
)
def test_bad_options_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FWLoraArguments(method="iw_lora", **kwargs)


def test_norm_statistic_with_running_mean_while_training(tmp_path):
    # lr = 0: every step's reference is autograd on the initial weights.
    dataset = TokenDataset(size=24)
    model, fw_args = lora_model(fw_warmup_steps=3, fw_statistic="norm", fw_average="mean")
    expected = sum(reference_sq_grad_norms(model, rows(dataset, 8 * t, 8 * t + 8)).sqrt() for t in range(3)) / 3
    trainer = SequentialFWLoraTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=3, learning_rate=0.0),
        train_dataset=dataset,
        fw_args=fw_args,
    )
    trainer.train()
    torch.testing.assert_close(trainer.fisher_callback.fisher, expected, rtol=1e-4, atol=0)


class _SnapshotAtFirstStep(TrainerCallback):
    """Copies the trainable parameters in the first training step, right before its optimizer update (so after the
    calibration, which runs before that step's first forward pass)."""

    def __init__(self, model):
        self.model = model
        self.snapshot = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.snapshot is None:
            self.snapshot = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def test_calibration_updates_nothing_then_trains_every_requested_step(tmp_path):
    dataset = TokenDataset(size=64)
    model, fw_args = lora_model(method="iw_lora", fw_warmup_steps=2, fw_lambda=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # The calibration reads the first two batches (sequential order) at the initial weights.
    expected = sum(reference_sq_grad_norms(model, rows(dataset, 8 * t, 8 * t + 8)).sqrt() for t in range(2)) / 2
    spy = _SnapshotAtFirstStep(model)
    trainer = SequentialFWLoraTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=5, gradient_accumulation_steps=1),
        train_dataset=dataset,
        fw_args=fw_args,
        callbacks=[spy],
    )
    trainer.train()

    callback = trainer.fisher_callback
    assert callback.frozen_at_step == 0 and not callback.is_measuring
    torch.testing.assert_close(callback.fisher, expected, rtol=1e-4, atol=0)
    for name, value in before.items():
        torch.testing.assert_close(spy.snapshot[name], value, rtol=0, atol=0, msg=name)
    # Then the full 5 steps: 5 optimizer steps, 5 scheduler steps, and the penalty from the first of them.
    assert trainer.state.global_step == 5
    adam_steps = {int(state["step"]) for state in trainer.optimizer.state.values()}
    assert adam_steps == {5}
    assert trainer.lr_scheduler.last_epoch == 5
    penalised = [log for log in trainer.state.log_history if "fw_penalty" in log]
    assert [log["step"] for log in penalised] == [1, 2, 3, 4, 5]
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_power_of_the_penalty_weights(tmp_path):
    model, fw_args = lora_model(fw_warmup_steps=1, fw_power=3.0, fw_normalization="max", fw_lambda=1e-2)
    trainer = SequentialFWLoraTrainer(
        model=model, args=training_args(tmp_path, max_steps=3), train_dataset=TokenDataset(), fw_args=fw_args
    )
    trainer.train()
    importances = trainer.fisher_callback.importances
    weights = (1 - importances) ** 3
    torch.testing.assert_close(trainer.fisher_callback.penalty_weights, weights)
    expected = brute_force_penalty(find_adapted_matrices(model), weights)
    torch.testing.assert_close(trainer.fisher_callback.penalty(), expected, rtol=1e-5, atol=0)
