"""The Fisher-weighted penalty `R = Σ_m w_m ‖ΔW_m‖²`, batched over matrices of equal shape."""

from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Optional, Union

import torch

from .adapted_matrices import AdaptedMatrix
from .arguments import check_option, default_of
from .autocast import autocast_disabled


# `torch.bmm`, or a form of it that a compiler fuses: (G, n, k) × (G, k, m) → (G, n, m).
BatchedProduct = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FisherWeightedPenalty:
    r"""
    Computes `R = Σ_m w_m · P_m` over the adapted matrices, with `w_m = 1 − I_m` and either
    `P_m = ‖s_m B_m A_m‖_F²` (`penalty="delta"`, exact) or `P_m = ‖A_m‖_F² + ‖B_m‖_F²` (`penalty="factors"`, the
    cheaper surrogate, an ablation).

    `B A` (`d_out × d_in`) is never formed: `‖B A‖_F² = tr((BᵀB)(A Aᵀ)) = Σ (BᵀB) ⊙ (A Aᵀ)` needs two `r × r` Gram
    matrices. Matrices with the same shapes are stacked and handled by one batched kernel each, so one call costs
    O(number of distinct shapes) kernels, not O(number of matrices) (roberta-base: 3 groups for 72 matrices).

    Two ways to use it:

    - `penalty()`: `R` as a differentiable scalar, to add to a loss (any training loop; autograd then adds one
      gradient accumulation per LoRA tensor, 144 small kernels on roberta-base). Under FSDP2 (`fully_shard`) this is
      the way: the sharded factors are gathered for it, and its gradient reaches the shards through autograd;
    - `penalty.backward()`: adds `λ ∇R` (or `scale · ∇R`) straight into the LoRA tensors' `.grad`, from the analytic
      gradient (`∂P/∂A = 2 s² BᵀB A`, `∂P/∂B = 2 s² B A Aᵀ`), with one `torch._foreach_add_` per group: about a
      dozen kernels per distinct shape, forward and backward together, whatever the number of matrices. It returns
      `R`. Since `R` does not depend on the data, its gradient is added once per optimizer step, after the last
      micro-batch's backward pass (and, with DDP, after the all-reduce: every process adds the same gradient).
      `FWLoraTrainer` uses this path.

    Args:
        matrices (`Sequence[AdaptedMatrix]`): The adapted matrices.
        weights (`torch.Tensor`): Per-matrix weights `w_m`, shape `(M,)`, in the order of `matrices`.
        penalty (`str`, *optional*, defaults to `"delta"`): `"delta"` or `"factors"`.
        fw_lambda (`float`, *optional*, defaults to `1e-4`):
            `λ`, the penalty's strength in the loss `L_task + λ R`: [`backward`] adds `λ ∇R` unless told another
            factor. Held as `fw_lambda` and as `strength`, the same value as a 0-dim fp32 tensor on the adapters'
            device (multiplying by it reads nothing back to the host).
    """

    def __init__(
        self,
        matrices: Sequence[AdaptedMatrix],
        weights: torch.Tensor,
        penalty: str = default_of("fw_penalty"),
        fw_lambda: float = default_of("fw_lambda"),
    ):
        check_option("fw_penalty", penalty, argument="penalty")
        check_option("fw_lambda", fw_lambda, argument="fw_lambda")
        if len(matrices) != weights.numel():
            raise ValueError(f"Got {len(matrices)} matrices but {weights.numel()} weights.")
        self.penalty = penalty
        groups = defaultdict(list)
        for index, matrix in enumerate(matrices):
            key = (tuple(matrix.lora_A.shape), tuple(matrix.lora_B.shape), matrix.lora_A.dtype, matrix.lora_A.device)
            groups[key].append(index)
        # Per group: the A and B parameters, and one fp32 coefficient per matrix (w · s² for the exact penalty), on the
        # device of the group's parameters (the weights may live elsewhere, e.g. when read back from a checkpoint).
        self._groups = []
        for indices in groups.values():
            a_params = [matrices[i].lora_A for i in indices]
            b_params = [matrices[i].lora_B for i in indices]
            device = a_params[0].device
            coefficients = weights.detach().to(device=device, dtype=torch.float32)[indices]
            if penalty == "delta":
                squared_scalings = [matrices[i].scaling ** 2 for i in indices]
                coefficients = coefficients * torch.tensor(squared_scalings, dtype=torch.float32, device=device)
            self._groups.append((a_params, b_params, coefficients))
        # FSDP2 (`fully_shard`) holds each parameter as a sharded DTensor: `R` is then computed from the gathered
        # factors (autograd reduce-scatters its gradient into the shards), and the analytic `.grad` path is refused.
        self._sharded = any(hasattr(matrix.lora_A, "full_tensor") for matrix in matrices)
        self.fw_lambda = fw_lambda
        self.strength = torch.tensor(fw_lambda, dtype=torch.float32, device=matrices[0].lora_A.device)

    @property
    def num_groups(self) -> int:
        """Number of distinct shapes, i.e. of batched kernels per call."""
        return len(self._groups)

    def __call__(self) -> torch.Tensor:
        """The penalty `R` as a differentiable fp32 scalar on the parameters' device (computed outside autocast)."""
        total = None
        with autocast_disabled(self._groups[0][0][0].device):
            for a_params, b_params, coefficients in self._groups:
                group_total = torch.dot(coefficients, self._terms(a_params, b_params)[-1])
                total = group_total if total is None else total + group_total
        return total

    def _terms(
        self, a_params: list[torch.Tensor], b_params: list[torch.Tensor], bmm: BatchedProduct = torch.bmm
    ) -> tuple[torch.Tensor, ...]:
        """One group's stacked factors `A` `(G, r, d_in)` and `B` `(G, d_out, r)` in fp32, and for the exact penalty
        their Gram matrices `A Aᵀ` and `BᵀB` `(G, r, r)` (else `None`), and `P_m` per matrix `(G,)`."""
        if self._sharded:
            a_params, b_params = [p.full_tensor() for p in a_params], [p.full_tensor() for p in b_params]
        a = torch.stack(a_params).float()
        b = torch.stack(b_params).float()
        if self.penalty == "delta":
            gram_a = bmm(a, a.transpose(1, 2))
            gram_b = bmm(b.transpose(1, 2), b)
            return a, b, gram_a, gram_b, (gram_a * gram_b).sum(dim=(1, 2))
        return a, b, None, None, a.square().sum(dim=(1, 2)) + b.square().sum(dim=(1, 2))

    def compiled_backward(self, backend: str, mode: Optional[str] = None) -> Callable[..., torch.Tensor]:
        """
        [`backward`] compiled with `torch.compile` (`backend` and `mode` as the model's, see [`compile_backend`]), for
        a compiled training step; call it with the factor of the gradient (`penalty.strength`, times a loss scale).
        Its batched products are written as a broadcast product and a sum, which the compiler fuses with the rest
        (one generated kernel on the CPU for roberta's three shapes and 72 matrices, where `bmm` would stay four
        library calls per shape); eagerly that form would materialise `(G, r, r, d)` tensors, so [`backward`] keeps
        `bmm`. The same values, up to rounding.
        """
        return torch.compile(partial(self._backward, _broadcast_bmm), backend=backend, mode=mode)

    def backward(self, scale: Optional[Union[float, torch.Tensor]] = None) -> torch.Tensor:
        r"""
        Adds `scale · ∇R` (by default `λ ∇R`) into the `.grad` of every LoRA tensor (as `(scale · R).backward()`
        would, without autograd) and returns `R`, detached, in fp32.

        Per distinct shape: two stacks, two `r × r` Gram matrices, `R`'s share, the two gradients as batched products
        with the Gram matrices, and one `torch._foreach_add_` per factor. Everything stays on the parameters' device in
        fp32 (outside autocast); nothing is read back to the host.

        Args:
            scale (`float` or `torch.Tensor`, *optional*, defaults to `λ`):
                The factor of the gradient: `λ` (`strength`), times whatever scales the rest of the gradient (an fp16
                loss scale, a 0-dim tensor, is welcome: no host read).
        """
        return self._backward(torch.bmm, self.strength if scale is None else scale)

    @torch.no_grad()
    def _backward(self, bmm: BatchedProduct, scale: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
        if self._sharded:
            raise RuntimeError(
                "The LoRA factors are sharded (FSDP2's DTensor parameters): the penalty's gradient cannot be written "
                "into their `.grad`. Add `λ * penalty()` to the loss instead; autograd carries it into the shards."
            )
        total = None
        twice_scale = 2 * scale  # d/dX of c·P(X) is 2c times the factor below, per matrix
        with autocast_disabled(self._groups[0][0][0].device):
            for a_params, b_params, coefficients in self._groups:
                a, b, gram_a, gram_b, per_matrix = self._terms(a_params, b_params, bmm)
                twice_scaled = (coefficients * twice_scale).view(-1, 1, 1)  # `c` broadcast over each matrix
                if self.penalty == "delta":
                    grad_a = bmm(gram_b * twice_scaled, a)  # 2c BᵀB A
                    grad_b = bmm(b, gram_a * twice_scaled)  # 2c B A Aᵀ
                else:
                    grad_a, grad_b = a * twice_scaled, b * twice_scaled
                _accumulate_grads(a_params, grad_a)
                _accumulate_grads(b_params, grad_b)
                group_total = torch.dot(coefficients, per_matrix)
                total = group_total if total is None else total + group_total
        return total


def _broadcast_bmm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`torch.bmm(x, y)` as a broadcast product summed over the shared dimension: for `torch.compile` to fuse."""
    return (x.unsqueeze(-1) * y.unsqueeze(-3)).sum(dim=-2)


def _accumulate_grads(params: list[torch.Tensor], stacked: torch.Tensor) -> None:
    """`p.grad += stacked[i]` for every parameter, in one multi-tensor kernel (a parameter without a gradient yet gets
    one)."""
    grads = stacked.to(params[0].dtype).unbind(0)
    if all(p.grad is not None for p in params):
        torch._foreach_add_([p.grad for p in params], grads)
        return
    for param, grad in zip(params, grads):
        if param.grad is None:
            param.grad = grad.clone()
        else:
            param.grad.add_(grad)
