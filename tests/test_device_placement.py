"""Device and dtype discipline without a GPU: FW-LoRA's tensors follow the model, never the defaults.

CI has no GPU, so a tensor built without an explicit device (it lands on the CPU, and meets CUDA tensors on a GPU)
or in the wrong dtype would go unseen. Two tricks make such a tensor fail on a CPU-only machine:

- the model on the `meta` device: any CPU tensor the penalty or the hooks build meets meta tensors and raises;
- the model on the CPU, FW-LoRA's own code run under a *default* device of `meta` and a default dtype of float64:
  any tensor it builds from the defaults (no `device=`, no `dtype=`) lands on `meta` or in float64, so the run fails
  or its statistics leave fp32. This covers the whole Trainer path (estimator, hooks, sketch, freeze, calibration,
  penalty).
"""

import functools
import traceback

import pytest
import torch
from conftest import TokenDataset, lora_model, training_args
from torch.utils._python_dispatch import TorchDispatchMode

from fw_trainer import (
    FisherEstimator,
    FisherWarmupCallback,
    FisherWeightedPenalty,
    FWLoraTrainer,
    find_adapted_matrices,
)
from fw_trainer.fisher_estimator import _FisherTap


def meta_model_and_batch(**fw_kwargs):
    model, _ = lora_model(**fw_kwargs)
    model.to("meta").train()
    dataset = TokenDataset(size=8)
    # No attention mask: transformers' mask builder reads values, which meta tensors have none of.
    batch = {"input_ids": dataset.input_ids.to("meta"), "labels": dataset.labels.to("meta")}
    return model, batch


def test_penalty_follows_the_model_to_another_device():
    model, _ = meta_model_and_batch(lora_alpha=3.0)
    matrices = find_adapted_matrices(model)
    weights = torch.rand(len(matrices), device="meta")

    value = FisherWeightedPenalty(matrices, weights)()
    value.backward()

    assert value.device.type == "meta" and value.dtype == torch.float32 and value.shape == ()
    assert all(matrix.lora_A.grad.device.type == "meta" for matrix in matrices)


def test_penalty_takes_cpu_weights_to_the_model_device():
    """Importances read back from a checkpoint may sit on the CPU while the adapters sit elsewhere."""
    model, _ = meta_model_and_batch()
    matrices = find_adapted_matrices(model)
    assert FisherWeightedPenalty(matrices, torch.rand(len(matrices)))().device.type == "meta"


def test_exact_hooks_follow_the_model_to_another_device():
    # The sketch draws its probes from a generator on the model's device, which `meta` does not have; it is covered
    # by the default-device test below.
    model, batch = meta_model_and_batch()
    estimator = FisherEstimator(model)
    estimator.start()

    estimator.loss_to_backpropagate(model(**batch).loss).backward()
    estimator.fold_micro_batch()
    estimator.end_step()
    estimator.stop()

    for state in (estimator._running, estimator._num_updates, estimator.fisher):
        assert state.device.type == "meta" and state.dtype == torch.float32


def _under_foreign_defaults(function):
    """`function` run with `meta` as the default device and float64 as the default dtype."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            with torch.device("meta"):
                return function(*args, **kwargs)
        finally:
            torch.set_default_dtype(dtype)

    return wrapper


def _trapped(attribute):
    """A method or property of a class, run under foreign defaults."""
    if isinstance(attribute, property):
        return property(_under_foreign_defaults(attribute.fget))
    return _under_foreign_defaults(attribute)


def _untrapped(attribute):
    """The original of a `_trapped` attribute."""
    if isinstance(attribute, property):
        return property(attribute.fget.__wrapped__)
    return attribute.__wrapped__


# Every method and property of FW-LoRA's own tensor code; IW-LoRA's calibration loop (`calibrate`, with the trainer's
# `_calibration_backward`) is left out because it runs the dataloader and the model's forward (transformers' code), but
# everything it calls on FW-LoRA's side is in the list.
FOREIGN_DEFAULT_METHODS = {
    FisherEstimator: (
        "__init__",
        "start",
        "stop",
        "loss_to_backpropagate",
        "fold_micro_batch",
        "end_step",
        "fisher",
        "state_dict",
        "load_state_dict",
        "_forward_hook",
        "_draw_sketch_probes",
        "_fold_norms",
        "_average_step",
    ),
    _FisherTap: ("forward", "backward"),
    FisherWarmupCallback: (
        "penalty_weights",
        "penalty",
        "_setup",
        "freeze",
        "on_train_begin",
        "on_substep_end",
        "on_pre_optimizer_step",
        "on_step_end",
        "on_train_end",
        "state_dict",
        "_apply_state",
    ),
    FisherWeightedPenalty: ("__init__", "__call__"),
}


@pytest.fixture
def foreign_defaults(monkeypatch):
    for cls, names in FOREIGN_DEFAULT_METHODS.items():
        for name in names:
            monkeypatch.setattr(cls, name, _trapped(getattr(cls, name)))


def run_fw_lora(output_dir, **fw_kwargs):
    model, fw_args = lora_model(fw_warmup_steps=2, fw_lambda=1e-1, **fw_kwargs)
    trainer = FWLoraTrainer(
        model=model,
        args=training_args(output_dir, max_steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=4),
        train_dataset=TokenDataset(size=32),
        fw_args=fw_args,
    )
    trainer.train()
    return trainer, model


@pytest.mark.parametrize(
    "fw_kwargs",
    [
        {"fw_estimator": "exact"},
        {"fw_estimator": "sketch"},
        {"fw_estimator": "exact", "fw_warmup_mode": "calibrate"},
        {"fw_estimator": "sketch", "fw_warmup_mode": "calibrate", "fw_statistic": "norm", "fw_average": "mean"},
    ],
    ids=["exact-train", "sketch-train", "exact-calibrate", "sketch-calibrate-iw"],
)
def test_no_tensor_is_built_from_the_default_device_or_dtype(tmp_path, fw_kwargs, foreign_defaults):
    trainer, model = run_fw_lora(tmp_path / "trapped", **fw_kwargs)
    callback = trainer.fisher_callback
    assert callback.frozen
    estimator = callback.estimator
    for state in (callback.fisher, callback.importances, estimator._running, estimator._num_updates):
        assert state.device.type == "cpu" and state.dtype == torch.float32
    # The penalty ran in every step after the warm-up (4 in all, 2 of which are warm-up steps unless calibrating).
    penalised = sum("fw_penalty" in log for log in trainer.state.log_history)
    assert penalised == (4 if fw_kwargs.get("fw_warmup_mode") == "calibrate" else 2)

    # The trap changes nothing: the same run without it gives the same statistics and weights, bit for bit.
    reference, reference_model = _run_untrapped(tmp_path / "reference", fw_kwargs)
    assert torch.equal(callback.fisher, reference.fisher_callback.fisher)
    for param, reference_param in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(param, reference_param)


def _run_untrapped(output_dir, fw_kwargs):
    """`run_fw_lora` with the original methods, while `foreign_defaults` is in force."""
    originals = {}
    for cls, names in FOREIGN_DEFAULT_METHODS.items():
        for name in names:
            originals[(cls, name)] = getattr(cls, name)
            setattr(cls, name, _untrapped(getattr(cls, name)))
    try:
        return run_fw_lora(output_dir, **fw_kwargs)
    finally:
        for (cls, name), method in originals.items():
            setattr(cls, name, method)


class _HostSyncSpy(TorchDispatchMode):
    """Records every device-to-host read (`.item()`, `float(t)`, `bool(t)`, ...) made from `fw_trainer`'s code, with
    the optimizer step it happened in."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer
        self.syncs: list[tuple[int, str]] = []

    def record(self, what: str) -> None:
        # The caller is the innermost frame outside torch and this file: fw_trainer's own code, or another library's
        # (the Trainer reads the loss back at every step, which is not ours to change).
        for frame in reversed(traceback.extract_stack()):
            if "/torch/" not in frame.filename and frame.filename != __file__:
                if "/fw_trainer/" in frame.filename:
                    self.syncs.append((self.trainer.state.global_step, f"{what} in {frame.name}"))
                return

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.record("item")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("estimator", ["exact", "sketch"])
def test_no_host_sync_per_training_step(tmp_path, monkeypatch, estimator):
    """FW-LoRA reads nothing back to the host during a training step: only at the freeze, and in `log`."""
    model, fw_args = lora_model(fw_warmup_steps=3, fw_lambda=1e-1, fw_estimator=estimator)
    trainer = FWLoraTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=8, gradient_accumulation_steps=2, logging_steps=5),
        train_dataset=TokenDataset(size=64),
        fw_args=fw_args,
    )
    spy = _HostSyncSpy(trainer)
    # `tolist()` copies to the host without going through the dispatcher.
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (spy.record("tolist"), tolist(self))[1])
    with spy:
        trainer.train()

    steps = sorted({step for step, _ in spy.syncs})
    # Step 3 ends with the freeze (the importances are read once, for the table and fw_importance.json); step 5's
    # logging reads the averaged metrics. No other step reads anything.
    assert steps == [3, 5], spy.syncs
    assert {where.split(" in ")[1] for step, where in spy.syncs if step == 5} == {"log"}
