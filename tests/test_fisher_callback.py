"""The Fisher proxy of `FisherEstimator` and `FisherWarmupCallback` against autograd on unfrozen copies of the frozen
weights."""

import json
import os
import warnings

import pytest
import torch
from conftest import DEVICES, SequentialFWLoraTrainer, TokenDataset, lora_model, rows, training_args
from references import reference_sq_grad_norms
from transformers import TrainerCallback

from fw_trainer import FisherEstimator, FisherWarmupCallback, FWLoraArguments, find_adapted_matrices
from fw_trainer.fisher_estimator import _FisherTap
from fw_trainer.state_files import IMPORTANCE_FILE


def train(tmp_path, model, fw_args, dataset, trainer_cls=SequentialFWLoraTrainer, callbacks=None, **kwargs):
    trainer = trainer_cls(
        model=model,
        args=training_args(tmp_path, **kwargs),
        train_dataset=dataset,
        fw_args=fw_args,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("device", DEVICES)
def test_one_step_equals_autograd_on_padded_batch(tmp_path, device):
    dataset = TokenDataset(size=8)
    assert (dataset.attention_mask == 0).any(), "the batch must contain padding"
    # The exact estimator: `"auto"` is the (random) sketch on a GPU, which the bf16 test below compares in its place.
    model, fw_args = lora_model(fw_warmup_steps=1, fw_estimator="exact")
    expected = reference_sq_grad_norms(model, rows(dataset, 0, 8), device)

    trainer = train(tmp_path, model, fw_args, dataset, max_steps=1, device=device)
    assert trainer.fisher_callback.fisher.device.type == device

    # With one step the bias-corrected moving average is that step's value.
    torch.testing.assert_close(trainer.fisher_callback.fisher, expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(trainer.fisher_callback.importances, expected / expected.sum(), rtol=1e-4, atol=0)


def test_moving_average_over_steps_equals_hand_rolled_loop(tmp_path):
    # lr = 0 keeps the weights fixed, so each step's reference is autograd on the initial model.
    dataset = TokenDataset(size=32)
    decay = 0.9
    model, fw_args = lora_model(fw_warmup_steps=4, fw_ema_decay=decay)
    step_values = [reference_sq_grad_norms(model, rows(dataset, 8 * t, 8 * t + 8)) for t in range(4)]

    trainer = train(tmp_path, model, fw_args, dataset, max_steps=4, learning_rate=0.0)

    ema = torch.zeros_like(step_values[0])
    for value in step_values:
        ema = decay * ema + (1 - decay) * value
    expected = ema / (1 - decay**4)
    torch.testing.assert_close(trainer.fisher_callback.fisher, expected, rtol=1e-4, atol=0)


def test_gradient_accumulation_averages_micro_batch_values(tmp_path):
    """GA = 2 × 8 gives the mean of the two 8-row micro-batches' values, and trains exactly like 1 × 16.

    λ = 0, because the two F differ by definition (norm of a mean vs mean of norms) and so would the penalties.
    """
    dataset = TokenDataset(size=16)
    model, fw_args = lora_model(fw_warmup_steps=1, fw_lambda=0.0)
    halves = [
        reference_sq_grad_norms(model, rows(dataset, 0, 8)),
        reference_sq_grad_norms(model, rows(dataset, 8, 16)),
    ]

    accumulated = train(
        tmp_path / "ga2",
        model,
        fw_args,
        dataset,
        max_steps=3,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
    )
    torch.testing.assert_close(accumulated.fisher_callback.fisher, (halves[0] + halves[1]) / 2, rtol=1e-4, atol=0)

    model_16, fw_args_16 = lora_model(fw_warmup_steps=1, fw_lambda=0.0)
    single = train(tmp_path / "ga1", model_16, fw_args_16, dataset, max_steps=3, per_device_train_batch_size=16)
    losses = [log["loss"] for log in accumulated.state.log_history if "loss" in log]
    losses_16 = [log["loss"] for log in single.state.log_history if "loss" in log]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_16), rtol=1e-5, atol=0)
    for (name, param), param_16 in zip(model.named_parameters(), model_16.parameters()):
        torch.testing.assert_close(param, param_16, rtol=1e-5, atol=1e-7, msg=name)


def test_loss_scale_is_undone(tmp_path):
    """A real `GradScaler` (fp16-style dynamic loss scaling, here on the CPU) leaves F and the training unchanged."""
    dataset = TokenDataset(size=16)
    model, fw_args = lora_model(fw_warmup_steps=2)
    # No clipping: accelerate unscales before clipping only when it runs fp16 autocast itself, which it does not on
    # CPU.
    plain = train(tmp_path / "plain", model, fw_args, dataset, max_steps=2, max_grad_norm=0.0)

    scaled_model, scaled_fw_args = lora_model(fw_warmup_steps=2)
    scaled = SequentialFWLoraTrainer(
        model=scaled_model,
        args=training_args(tmp_path / "scaled", max_steps=2, max_grad_norm=0.0),
        train_dataset=dataset,
        fw_args=scaled_fw_args,
    )
    # The accelerator hands its scaler to the optimizer wrapper and scales the loss in `backward`, as with fp16 on GPU.
    scaled.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled.train()

    assert scaled.accelerator.scaler.get_scale() >= 2.0**12
    torch.testing.assert_close(scaled.fisher_callback.fisher, plain.fisher_callback.fisher, rtol=1e-5, atol=0)
    for param, scaled_param in zip(model.parameters(), scaled_model.parameters()):
        torch.testing.assert_close(scaled_param, param, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("estimator", ["exact", "sketch"])
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_measures_the_fp32_statistic(tmp_path, device, estimator):
    dataset = TokenDataset(size=8)
    model, fw_args = lora_model(fw_warmup_steps=1, fw_estimator=estimator, fw_sketch_probes=4096)
    expected = reference_sq_grad_norms(model, rows(dataset, 0, 8), device)
    trainer = train(tmp_path, model, fw_args, dataset, max_steps=1, bf16=True, device=device)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert trainer.fisher_callback.fisher.dtype == torch.float32
    # bf16 has an 8-bit mantissa: the forward/backward differ by about 1 %. The sketch's 4,096 probes add a relative
    # error of about sqrt(2 / 4096) ≈ 2 % per matrix.
    rtol = 5e-2 if estimator == "exact" else 1.5e-1
    torch.testing.assert_close(trainer.fisher_callback.fisher, expected, rtol=rtol, atol=0)


def test_gradient_checkpointing_gives_the_same_statistic(tmp_path):
    dataset = TokenDataset(size=8)
    model, fw_args = lora_model(fw_warmup_steps=1)
    expected = reference_sq_grad_norms(model, rows(dataset, 0, 8))
    trainer = train(tmp_path, model, fw_args, dataset, max_steps=1, gradient_checkpointing=True)
    torch.testing.assert_close(trainer.fisher_callback.fisher, expected, rtol=1e-4, atol=0)


def test_non_finite_micro_batch_is_skipped():
    dataset = TokenDataset(size=16)
    model, _ = lora_model()
    expected = reference_sq_grad_norms(model, rows(dataset, 0, 8))

    estimator = FisherEstimator(model)
    estimator.start()
    model.train()
    for start, factor in ((0, 1.0), (8, float("nan"))):
        loss = estimator.loss_to_backpropagate(model(**rows(dataset, start, start + 8)).loss) * factor
        loss.backward()
        estimator.fold_micro_batch()
    estimator.end_step()
    estimator.stop()

    fisher = estimator._running / (1 - estimator.ema_decay)
    torch.testing.assert_close(fisher, expected, rtol=1e-4, atol=0)
    assert estimator._num_updates.item() == 1


class _GradientSpy(TrainerCallback):
    """Records, right before every optimizer step, whether any frozen adapted weight holds a gradient."""

    def __init__(self, weights):
        self.weights = weights
        self.frozen_grads_seen = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.frozen_grads_seen.append(any(weight.grad is not None for weight in self.weights))


def test_after_warmup_no_hook_fires_and_frozen_weights_stay_frozen(tmp_path, monkeypatch):
    dataset = TokenDataset(size=64)
    model, fw_args = lora_model(fw_warmup_steps=2, fw_lambda=1e-2)
    matrices = find_adapted_matrices(model)
    frozen_before = [matrix.base_weight.detach().clone() for matrix in matrices]
    lora_before = [matrix.lora_A.detach().clone() for matrix in matrices]

    steps_at_hook_calls = []
    original_backward = _FisherTap.backward

    def spying_backward(ctx, *grads):
        steps_at_hook_calls.append(trainer.state.global_step)
        return original_backward(ctx, *grads)

    # The measurement of one matrix in the backward pass.
    monkeypatch.setattr(_FisherTap, "backward", staticmethod(spying_backward))
    spy = _GradientSpy([matrix.base_weight for matrix in matrices])
    trainer = SequentialFWLoraTrainer(
        model=model, args=training_args(tmp_path, max_steps=6), train_dataset=dataset, fw_args=fw_args, callbacks=[spy]
    )
    trainer.train()

    # One backward hook per matrix during each of the two warm-up steps (0 and 1), none afterwards.
    assert sorted(steps_at_hook_calls) == [0] * len(matrices) + [1] * len(matrices)
    assert not trainer.fisher_callback.is_measuring
    assert all(not matrix.layer._forward_hooks for matrix in matrices)
    assert spy.frozen_grads_seen == [False] * 6
    for matrix, before, lora in zip(matrices, frozen_before, lora_before):
        assert not matrix.base_weight.requires_grad and matrix.base_weight.grad is None
        torch.testing.assert_close(matrix.base_weight, before, rtol=0, atol=0)
        assert not torch.equal(matrix.lora_A, lora)
    # Frozen weights are not in the optimizer.
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(matrix.base_weight) for matrix in matrices}


def test_training_shorter_than_warmup_freezes_at_the_end(tmp_path):
    model, fw_args = lora_model(fw_warmup_steps=10)
    with pytest.warns(UserWarning, match="before the FW-LoRA warm-up"):
        trainer = train(tmp_path, model, fw_args, TokenDataset(), max_steps=3)
    assert trainer.fisher_callback.frozen and trainer.fisher_callback.frozen_at_step == 3
    assert trainer.fisher_callback.estimator._num_updates.item() == 3


def test_zero_warmup_gives_uniform_importances_with_a_warning(tmp_path):
    model, fw_args = lora_model(fw_warmup_steps=0)
    with pytest.warns(UserWarning, match="Falling back to uniform importances"):
        trainer = train(tmp_path, model, fw_args, TokenDataset(), max_steps=2)
    importances = trainer.fisher_callback.importances
    torch.testing.assert_close(importances, torch.full_like(importances, 1 / importances.numel()))


def test_importance_file_is_written(tmp_path):
    model, fw_args = lora_model(fw_warmup_steps=2, fw_normalization="max")
    trainer = train(tmp_path, model, fw_args, TokenDataset(), max_steps=3)
    with open(os.path.join(tmp_path, IMPORTANCE_FILE)) as f:
        saved = json.load(f)
    matrices = trainer.fisher_callback.matrices
    assert saved["frozen"] and saved["frozen_at_step"] == 2 and saved["normalization"] == "max"
    assert list(saved["modules"]) == [matrix.name for matrix in matrices]
    assert "roberta.encoder.layer.0.attention.self.query" in saved["modules"]
    for matrix, importance in zip(matrices, trainer.fisher_callback.importances.tolist()):
        row = saved["modules"][matrix.name]
        assert row["importance"] == pytest.approx(importance)
        assert row["penalty_weight"] == pytest.approx(1 - importance)
        assert (row["d_out"], row["d_in"], row["r"]) == (matrix.d_out, matrix.d_in, matrix.r)
    assert max(row["importance"] for row in saved["modules"].values()) == pytest.approx(1.0)


def test_lora_method_installs_no_hooks(tmp_path):
    model, fw_args = lora_model(method="lora")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer = train(tmp_path, model, fw_args, TokenDataset(), max_steps=2)
    assert trainer.fisher_callback is None
    assert all(not matrix.layer._forward_hooks for matrix in find_adapted_matrices(model))


def test_table_before_training_says_why_it_is_empty():
    with pytest.raises(RuntimeError, match="set up when training begins"):
        FisherWarmupCallback(FWLoraArguments(fw_warmup_steps=3)).format_table()
