"""What FW-LoRA computes, computed again the long way for the tests to check it against: the Fisher proxy by its
definition (autograd on a copy of the model whose frozen adapted weights are made trainable), and the penalty as a
sum over materialised `ΔW = get_delta_weight`."""

import copy

import torch

from fw_trainer import find_adapted_matrices


def unfrozen_copy(model, device: str = "cpu"):
    """A copy of `model` on `device`, in training mode, and its adapted frozen weights, which require gradients."""
    reference = copy.deepcopy(model).to(device)
    reference.train()
    weights = [matrix.base_weight for matrix in find_adapted_matrices(reference)]
    for weight in weights:
        weight.requires_grad_(True)
    return reference, weights


def reference_sq_grad_norms(model, batch, device: str = "cpu") -> torch.Tensor:
    """`‖∇W_m L‖_F²` by autograd in fp32 on `device`, for every adapted frozen weight of an unfrozen copy of
    `model`."""
    reference, weights = unfrozen_copy(model, device)
    batch = {key: value.to(device) for key, value in batch.items()}
    loss = reference(**batch).loss
    grads = torch.autograd.grad(loss, weights)
    return torch.stack([grad.pow(2).sum() for grad in grads])


def reference_fisher_under_accumulation(model, micro_batches, num_items: int) -> torch.Tensor:
    """The definition, by autograd on unfrozen copies of the adapted weights: the loss the Trainer optimises is each
    micro-batch's token sum over the step's `num_items` label tokens; the statistic of a micro-batch is
    `‖∇W (GA · L_micro)‖²` (the micro-batch on the scale of its own mean), averaged over the step's micro-batches."""
    reference, weights = unfrozen_copy(model)
    values = []
    for batch in micro_batches:
        loss = reference(**batch, num_items_in_batch=torch.tensor(num_items)).loss
        grads = torch.autograd.grad(len(micro_batches) * loss, weights)
        values.append(torch.stack([grad.pow(2).sum() for grad in grads]))
    return torch.stack(values).mean(0)


def brute_force_penalty(matrices, weights, penalty: str = "delta") -> torch.Tensor:
    """`Σ_m w_m ‖ΔW_m‖_F²` over peft's `get_delta_weight` (`penalty="delta"`), or `Σ_m w_m (‖A_m‖_F² + ‖B_m‖_F²)`
    (`"factors"`)."""
    total = 0.0
    for matrix, weight in zip(matrices, weights):
        if penalty == "delta":
            value = matrix.layer.get_delta_weight(matrix.adapter_name).pow(2).sum()
        else:
            value = matrix.lora_A.pow(2).sum() + matrix.lora_B.pow(2).sum()
        total = total + weight * value
    return total
