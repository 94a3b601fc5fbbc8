"""Kernel launches per training step, counted on the CPU with the profiler (see `fw_trainer.measurement`): on a GPU the
step is bound by the host launching kernels, so what FW-LoRA adds to a LoRA step must not grow with the number of
adapted matrices (after the warm-up), and stays at two kernels per matrix during it."""

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from conftest import TokenDataset, tiny_roberta, training_args
from transformers import TrainerCallback

from fw_trainer import FisherWeightedPenalty, FWLoraArguments, FWLoraTrainer, build_peft_model, find_adapted_matrices
from fw_trainer.measurement import count_kernels, launched_operators


class ProfileStep(TrainerCallback):
    """Profiles optimizer step `step` (its micro-batches, clipping, optimizer and scheduler steps)."""

    def __init__(self, step: int):
        self.step = step
        self.counts = None
        self._profile = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profile.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._profile is not None and state.global_step == self.step:
            self._profile.__exit__(None, None, None)
            self.counts = launched_operators(self._profile)
            self._profile = None


def step_ops(tmp_path, method: str, layers: int, step: int = 3, **fw_kwargs):
    model = build_peft_model(tiny_roberta(num_hidden_layers=layers), FWLoraArguments(method=method, **fw_kwargs))[0]
    profiler = ProfileStep(step)
    args = training_args(tmp_path / f"{method}-{layers}", max_steps=step, logging_steps=100)
    fw_args = FWLoraArguments(method=method, **fw_kwargs)
    FWLoraTrainer(
        model=model, args=args, train_dataset=TokenDataset(size=32), fw_args=fw_args, callbacks=[profiler]
    ).train()
    return profiler.counts


def count_launched_operators(fn: Callable[[], object]) -> Counter:
    """[`launched_operators`] of one call of `fn`, profiled on the CPU."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return launched_operators(profile)


def penalty_with_gradients(layers: int) -> FisherWeightedPenalty:
    model = build_peft_model(tiny_roberta(num_hidden_layers=layers), FWLoraArguments(method="fw_lora"))[0]
    matrices = find_adapted_matrices(model)
    for matrix in matrices:
        for param in (matrix.lora_A, matrix.lora_B):
            param.grad = torch.zeros_like(param)  # as in training: the task loss's gradient is there already
    return FisherWeightedPenalty(matrices, torch.rand(len(matrices)))


def test_fused_penalty_gradient_launches_the_same_kernels_whatever_the_number_of_matrices():
    small, large = penalty_with_gradients(2), penalty_with_gradients(4)  # 12 and 24 matrices, 3 shapes each
    fused = {
        name: count_launched_operators(lambda p=p: p.backward(0.1)) for name, p in (("small", small), ("large", large))
    }
    assert fused["small"] == fused["large"]
    # Per shape: two stacks, four small bmm, the value, and one multi-tensor add per factor; no per-tensor add.
    assert sum(fused["large"].values()) <= 15 * large.num_groups
    assert fused["large"]["aten::_foreach_add_"] == 2 * large.num_groups
    assert "aten::add_" not in fused["large"]
    # The counter does see per-tensor work: autograd's path accumulates into each of the 48 more LoRA tensors.
    autograd = {
        name: count_launched_operators(lambda p=p: p().backward()) for name, p in (("small", small), ("large", large))
    }
    assert autograd["large"]["aten::add_"] - autograd["small"]["aten::add_"] == 24


@pytest.mark.parametrize("penalty", ["delta", "factors"])
def test_fw_lora_step_after_the_warmup_is_a_lora_step_plus_a_fixed_penalty(tmp_path, penalty):
    extra = {}
    for layers in (1, 2):
        lora = step_ops(tmp_path, "lora", layers)
        fw_lora = step_ops(tmp_path, "fw_lora", layers, fw_warmup_steps=1, fw_lambda=0.1, fw_penalty=penalty)
        extra[layers] = fw_lora - lora
        assert not lora - fw_lora, "FW-LoRA's step should do everything a LoRA step does, and only add to it"
    assert extra[1] == extra[2]  # 6 more matrices, not one kernel more
    assert sum(extra[2].values()) <= 15 * 3 + 5  # the penalty's kernels for 3 shapes, and its share of the loss


@pytest.mark.parametrize(
    "estimator, per_layer",
    [
        # Per adapted matrix, in the backward pass: `Gᵀ X` and its norm, the gradient of the matrix's probe.
        ("exact", {"aten::mm": 6, "aten::linalg_vector_norm": 6}),
        # The same on `(X Z)ᵀ G`, plus `X Z` per matrix in the forward pass: three kernels per matrix. (q, k and v
        # read the same input: eagerly their `X Z` is computed three times; a compiled graph computes it once.)
        ("sketch", {"aten::mm": 6 + 6, "aten::linalg_vector_norm": 6}),
    ],
)
def test_warmup_adds_two_or_three_kernels_per_adapted_matrix(tmp_path, estimator, per_layer):
    extra = {}
    for layers in (1, 2):
        lora = step_ops(tmp_path, "lora", layers)
        warmup = step_ops(tmp_path, "fw_lora", layers, fw_warmup_steps=100, fw_estimator=estimator)
        extra[layers] = warmup - lora
    assert dict(extra[2] - extra[1]) == per_layer  # what one more layer of 6 adapted matrices adds
    assert sum(extra[1].values()) - sum(per_layer.values()) <= 16  # and a fixed cost per step (fold, average, probes)


class ProfileKernels(ProfileStep):
    """Profiles step `step` and counts its kernels as the benchmark does: launched operators plus inductor's C++
    kernels ([`count_kernels`])."""

    def on_step_end(self, args, state, control, **kwargs):
        if self._profile is not None and state.global_step == self.step:
            self._profile.__exit__(None, None, None)
            self.counts = count_kernels(self._profile, "cpu")
            self._profile = None


def fast_step_kernels(tmp_path, method: str, **fw_kwargs) -> int:
    """Kernels of step 3 of a run compiled with inductor (the fast path), after two steps that compile."""
    torch.compiler.reset()
    model = build_peft_model(tiny_roberta(), FWLoraArguments(method=method, **fw_kwargs))[0]
    model.config.problem_type = "single_label_classification"  # else set at the first step: one recompile more
    profiler = ProfileKernels(3)
    args = training_args(tmp_path / f"{method}-{len(fw_kwargs)}", max_steps=3, logging_steps=100, torch_compile=True)
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        FWLoraTrainer(
            model=model,
            args=args,
            train_dataset=TokenDataset(size=32),
            fw_args=FWLoraArguments(method=method, **fw_kwargs),
            callbacks=[profiler],
        ).train()
    return profiler.counts


def test_on_the_fast_path_fw_lora_costs_what_lora_costs(tmp_path):
    """Compiled with inductor: the warm-up (its measurement traced into the graph) adds at most three kernels per
    adapted matrix, and a penalised step at most 3 % over LoRA's (the compiled penalty is a kernel or two). Failed
    before: the warm-up ran eagerly (~1.7x LoRA's kernels), and the penalty's ~45 eager operators ran beside the
    graph."""
    matrices = 12  # two layers of six roles
    lora = fast_step_kernels(tmp_path, "lora")
    for estimator in ("exact", "sketch"):
        warmup = fast_step_kernels(tmp_path, "fw_lora", fw_warmup_steps=100, fw_estimator=estimator)
        assert warmup <= lora + 3 * matrices, (estimator, warmup, lora)
    penalised = fast_step_kernels(tmp_path, "fw_lora", fw_warmup_steps=1, fw_lambda=0.1)
    assert penalised <= 1.03 * lora, (penalised, lora)
