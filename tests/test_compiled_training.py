"""The fast path: `--torch_compile` on the CPU (where compilation works too), against eager training. FW-LoRA's
warm-up compiles, its measurement traced into the model's graph without a break; at the freeze the model recompiles
once into LoRA's own graph; and the run trains to the eager run's losses and importances."""

import pytest
import torch
from conftest import TokenDataset, lora_model, training_args
from transformers import TrainerCallback

from fw_trainer import FWLoraTrainer, find_adapted_matrices
from fw_trainer.measurement import compile_stats, reset_compile_stats


class CompileStatsPerStep(TrainerCallback):
    def __init__(self):
        self.stats = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.stats[state.global_step] = compile_stats()


def train(tmp_path, method: str, backend=None, callbacks=(), device="cpu", bf16=False, **fw_kwargs) -> FWLoraTrainer:
    torch.compiler.reset()
    reset_compile_stats()
    model, fw_args = lora_model(method=method, **fw_kwargs)
    # transformers sets `problem_type` at the first forward, which makes any compiled model (LoRA's too) recompile
    # once at the second step: set here, so that the counts below are FW-LoRA's alone.
    model.config.problem_type = "single_label_classification"
    compiled = {"torch_compile": True, "torch_compile_backend": backend} if backend else {}
    args = training_args(tmp_path / f"{method}-{backend}", device=device, max_steps=6, bf16=bf16, **compiled)
    trainer = FWLoraTrainer(
        model=model, args=args, train_dataset=TokenDataset(size=48), fw_args=fw_args, callbacks=list(callbacks)
    )
    trainer.train()
    return trainer


def training_logs(trainer: FWLoraTrainer, names=("loss", "task_loss", "fw_penalty")) -> dict[str, list[float]]:
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return {name: [log[name] for log in logs if name in log] for name in names}


FW_LORA = {"fw_warmup_steps": 3, "fw_lambda": 0.1}


@pytest.mark.parametrize(
    "method, backend, fw_kwargs",
    [
        ("fw_lora", "inductor", FW_LORA),  # generated C++ kernels: same losses up to rounding
        ("lora", "aot_eager", {}),
        ("adalora", "aot_eager", {"adalora_tinit": 1, "adalora_tfinal": 1}),  # the rank allocator reshapes E in place
    ],
)
def test_compiled_training_gives_the_eager_losses(tmp_path, method, backend, fw_kwargs):
    eager = train(tmp_path, method, **fw_kwargs)
    compiled = train(tmp_path, method, backend, **fw_kwargs)
    expected, actual = training_logs(eager), training_logs(compiled)
    assert len(actual["loss"]) == 6
    if method == "fw_lora":
        assert len(actual["fw_penalty"]) == 3
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5)
    for (name, param), (_, eager_param) in zip(compiled.model.named_parameters(), eager.model.named_parameters()):
        torch.testing.assert_close(param, eager_param, rtol=1e-4, atol=1e-5, msg=name)
    breaks = [log["compile/graph_breaks"] for log in compiled.state.log_history if "loss" in log]
    if method != "adalora":  # peft's AdaLoRA layers have breaks of their own (`requires_grad` set in `forward`, ...)
        assert breaks == [0] * 6


@pytest.mark.parametrize("mode", ["train", "calibrate"])
@pytest.mark.parametrize("estimator", ["exact", "sketch"])
def test_the_warmup_compiles_and_the_freeze_recompiles_once(tmp_path, estimator, mode):
    """Failed before: the warm-up was forced eager (no graph compiled in steps 1-3), the model compiled at step 4."""
    per_step = CompileStatsPerStep()
    options = {**FW_LORA, "fw_estimator": estimator, "fw_warmup_mode": mode}
    trainer = train(tmp_path, "fw_lora", "aot_eager", callbacks=[per_step], **options)
    warmup = [per_step.stats[step] for step in (1, 2, 3)]
    if mode == "train":
        # The warm-up's steps: compiled from the first, with the measurement in the graph (and, by step 2, the
        # average's arithmetic beside it), then reused: no break, no recompilation.
        assert warmup[0]["graphs"] >= 1 and warmup[1] == warmup[2]
        assert all(stats["graph_breaks"] == stats["recompiles"] == 0 for stats in warmup)
        # The freeze: one recompilation, into a graph without the tap (and the penalty's own), reused afterwards.
        after = per_step.stats[4]
        assert after["recompiles"] == 1 and after["graph_breaks"] == 0 and after["graphs"] > warmup[2]["graphs"]
    else:
        # IW-LoRA: the calibration compiles with the tap before step 1, the training steps recompile once without.
        after = warmup[0]
        assert after["recompiles"] == 1 and after["graph_breaks"] == 0
    assert per_step.stats[5] == per_step.stats[6] == after
    assert not trainer.fisher_callback.is_measuring


@pytest.mark.parametrize(
    "estimator, mode, bf16",
    # Each estimator, mode and precision at least once (each run compiles: minutes on 2 cores for all eight).
    [
        ("exact", "train", False),
        ("sketch", "calibrate", False),
        ("exact", "calibrate", True),
        ("sketch", "train", True),
    ],
)
def test_compiled_fisher_equals_eager(tmp_path, estimator, mode, bf16):
    options = {**FW_LORA, "fw_estimator": estimator, "fw_warmup_mode": mode}
    eager = train(tmp_path / "eager", "fw_lora", bf16=bf16, **options)
    compiled = train(tmp_path / "compiled", "fw_lora", "aot_eager", bf16=bf16, **options)
    # fp32 statistics either way; bf16 autocast computes the model in bf16 in both, the same operators.
    torch.testing.assert_close(compiled.fisher_callback.fisher, eager.fisher_callback.fisher, rtol=1e-4, atol=0)
    torch.testing.assert_close(
        compiled.fisher_callback.importances, eager.fisher_callback.importances, rtol=1e-4, atol=0
    )


@pytest.mark.gpu
def test_fw_lora_compiled_on_cuda_in_bf16_gives_the_eager_losses(tmp_path):
    eager = train(tmp_path, "fw_lora", device="cuda", bf16=True, **FW_LORA)
    compiled = train(tmp_path, "fw_lora", "inductor", device="cuda", bf16=True, **FW_LORA)
    expected, actual = training_logs(eager), training_logs(compiled)
    assert len(actual["fw_penalty"]) == 3
    for name in expected:  # bf16 kernels fused differently: rounding-level differences
        torch.testing.assert_close(actual[name], expected[name], rtol=2e-2, atol=1e-3)
    assert all(log["compile/graph_breaks"] == 0 for log in compiled.state.log_history if "loss" in log)


def test_a_run_that_fails_in_the_warmup_removes_its_hooks(tmp_path):
    """An error in the warm-up (here the second step) must not leave the measurement on the model's layers."""

    class Fail(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    model, fw_args = lora_model(**FW_LORA)
    trainer = FWLoraTrainer(
        model=model, args=training_args(tmp_path), train_dataset=TokenDataset(), fw_args=fw_args, callbacks=[Fail()]
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not trainer.fisher_callback.is_measuring
    assert all(not matrix.layer._forward_hooks for matrix in find_adapted_matrices(model))
