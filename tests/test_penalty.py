"""`FisherWeightedPenalty` against a brute-force sum over materialised `ΔW = get_delta_weight`."""

import pytest
import torch
from conftest import DEVICES, lora_model
from references import brute_force_penalty

from fw_trainer import FisherWeightedPenalty, find_adapted_matrices


def randomized_matrices(device: str = "cpu", **fw_kwargs):
    """Adapted matrices of the tiny model with random A and B (peft initialises B to zero, making ΔW zero), and
    random weights, all on `device`."""
    model, _ = lora_model(**fw_kwargs)
    matrices = find_adapted_matrices(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for matrix in matrices:
            matrix.lora_A.copy_(torch.randn(matrix.lora_A.shape, generator=generator))
            matrix.lora_B.copy_(torch.randn(matrix.lora_B.shape, generator=generator))
    weights = torch.rand(len(matrices), generator=generator)
    model.to(device)
    return model, matrices, weights.to(device)


@pytest.mark.parametrize("penalty", ["delta", "factors"])
@pytest.mark.parametrize("lora_alpha", [16.0, 3.0])
@pytest.mark.parametrize("device", DEVICES)
def test_value_and_gradient_match_brute_force(penalty, lora_alpha, device):
    _, matrices, weights = randomized_matrices(device, lora_alpha=lora_alpha, lora_r=4)
    params = [p for matrix in matrices for p in (matrix.lora_A, matrix.lora_B)]

    expected = brute_force_penalty(matrices, weights, penalty)
    expected_grads = torch.autograd.grad(expected, params)
    penalty_fn = FisherWeightedPenalty(matrices, weights, penalty)
    value = penalty_fn()
    grads = torch.autograd.grad(value, params)

    assert value.device.type == device and value.dtype == torch.float32
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("penalty", ["delta", "factors"])
@pytest.mark.parametrize("scale", [0.37, "tensor"])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_backward_adds_the_autograd_gradient(penalty, scale, device):
    """`penalty.backward(scale)` (analytic gradient, `_foreach_add_`) adds what autograd gives for `scale · R`."""
    _, matrices, weights = randomized_matrices(device, lora_alpha=3.0, lora_r=4)
    params = [p for matrix in matrices for p in (matrix.lora_A, matrix.lora_B)]
    expected = brute_force_penalty(matrices, weights, penalty)
    expected_grads = torch.autograd.grad(0.37 * expected, params)
    previous = [torch.randn_like(p) for p in params]  # the task loss's gradients, already there
    for param, grad in zip(params, previous):
        param.grad = grad.clone()
    scale = torch.tensor(0.37, device=device) if scale == "tensor" else scale

    value = FisherWeightedPenalty(matrices, weights, penalty).backward(scale)

    assert value.device.type == device and value.dtype == torch.float32 and not value.requires_grad
    torch.testing.assert_close(value, expected.detach(), rtol=1e-5, atol=0)
    for param, grad, expected_grad in zip(params, previous, expected_grads):
        torch.testing.assert_close(param.grad - grad, expected_grad, rtol=1e-3, atol=1e-4)


def test_fused_backward_adds_lambda_times_the_gradient_to_a_parameter_without_one():
    """Without a factor, `backward()` adds `λ ∇R`: the penalty owns λ."""
    _, matrices, weights = randomized_matrices()
    params = [p for matrix in matrices for p in (matrix.lora_A, matrix.lora_B)]
    expected_grads = torch.autograd.grad(0.5 * brute_force_penalty(matrices, weights, "delta"), params)
    FisherWeightedPenalty(matrices, weights, fw_lambda=0.5).backward()
    for param, expected_grad in zip(params, expected_grads):
        torch.testing.assert_close(param.grad, expected_grad, rtol=1e-3, atol=1e-4)


def test_a_negative_lambda_is_refused():
    _, matrices, weights = randomized_matrices()
    with pytest.raises(ValueError, match="`fw_lambda` should be greater than or equal to 0"):
        FisherWeightedPenalty(matrices, weights, fw_lambda=-1e-4)


def test_matrices_of_equal_shape_share_one_group():
    # Tiny RoBERTa: q, k, v, attention output are 32×32, FFN in 48×32, FFN out 32×48.
    _, matrices, weights = randomized_matrices()
    assert len(matrices) == 12
    assert FisherWeightedPenalty(matrices, weights).num_groups == 3


def test_zero_weight_switches_a_matrix_off():
    _, matrices, weights = randomized_matrices()
    weights = torch.zeros_like(weights)
    weights[3] = 1.0
    expected = matrices[3].layer.get_delta_weight("default").pow(2).sum()
    torch.testing.assert_close(FisherWeightedPenalty(matrices, weights)(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_penalty_stays_fp32_under_bf16_autocast(device):
    _, matrices, weights = randomized_matrices(device)
    expected = brute_force_penalty(matrices, weights, "delta")
    with torch.autocast(device, dtype=torch.bfloat16):
        value = FisherWeightedPenalty(matrices, weights)()
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)


def test_mismatched_weights_are_rejected():
    _, matrices, weights = randomized_matrices()
    with pytest.raises(ValueError, match="12 matrices but 11 weights"):
        FisherWeightedPenalty(matrices, weights[:-1])
    with pytest.raises(ValueError, match="`penalty` should be"):
        FisherWeightedPenalty(matrices, weights, "l1")


@pytest.mark.parametrize("penalty", ["delta", "factors"])
def test_compiled_backward_adds_the_eager_gradient(penalty):
    """The compiled form (broadcast products that the compiler fuses) adds what `backward` adds, and returns R."""
    model, _ = lora_model()
    matrices = find_adapted_matrices(model)
    torch.manual_seed(0)
    for matrix in matrices:
        matrix.lora_B.data.normal_()
    weights = torch.rand(len(matrices))
    results = {}
    for name, function in (
        ("eager", FisherWeightedPenalty(matrices, weights, penalty).backward),
        ("compiled", FisherWeightedPenalty(matrices, weights, penalty).compiled_backward("aot_eager")),
    ):
        model.zero_grad(set_to_none=False)
        for matrix in matrices:
            matrix.lora_A.grad, matrix.lora_B.grad = torch.ones_like(matrix.lora_A), torch.ones_like(matrix.lora_B)
        value = function(torch.tensor(0.3))
        results[name] = (value, [g.clone() for m in matrices for g in (m.lora_A.grad, m.lora_B.grad)])
    torch.testing.assert_close(results["compiled"][0], results["eager"][0], rtol=1e-5, atol=0)
    for compiled, eager in zip(results["compiled"][1], results["eager"][1]):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)  # summed in another order
