"""Discovery of the frozen weight matrices that carry a LoRA adapter in a peft model."""

from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import nn


# peft prefixes every module name with these; users read names as they appear in the base model.
_PEFT_PREFIXES = ("base_model.model.", "module.")


@dataclass(frozen=True)
class AdaptedMatrix:
    """
    A frozen pretrained `nn.Linear` weight `W` (`d_out × d_in`) and the LoRA adapter `ΔW = scaling · B A` on it.

    Args:
        name (`str`): Module name in the base model, e.g. `roberta.encoder.layer.0.attention.self.query`.
        layer (`peft.tuners.lora.LoraLayer`): The peft layer wrapping the frozen linear layer.
        adapter_name (`str`): The adapter whose `A` and `B` are used.
    """

    name: str
    layer: LoraLayer
    adapter_name: str

    @property
    def base_weight(self) -> torch.Tensor:
        return self.layer.get_base_layer().weight

    @property
    def lora_A(self) -> torch.Tensor:
        return self.layer.lora_A[self.adapter_name].weight

    @property
    def lora_B(self) -> torch.Tensor:
        return self.layer.lora_B[self.adapter_name].weight

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter_name])

    @property
    def d_out(self) -> int:
        return self.base_weight.shape[0]

    @property
    def d_in(self) -> int:
        return self.base_weight.shape[1]

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]


def strip_peft_prefix(name: str) -> str:
    """Module name as it appears in the base model (without peft's and DDP's wrapper prefixes)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PEFT_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def find_adapted_matrices(model: nn.Module, adapter_name: str = "default") -> list[AdaptedMatrix]:
    """
    Every linear weight of `model` that carries the LoRA adapter `adapter_name`, in module order.

    Only peft `LoraLayer`s wrapping an `nn.Linear` count: LayerNorms, embeddings and the classifier head (trained in
    full through `modules_to_save`) never take part in the Fisher proxy or the penalty.
    """
    matrices = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        if not isinstance(module.get_base_layer(), nn.Linear):
            raise ValueError(
                f"FW-LoRA supports LoRA on `nn.Linear` layers only, but `{strip_peft_prefix(name)}` wraps a "
                f"{type(module.get_base_layer()).__name__}. Remove it from `lora_target_modules`."
            )
        matrices.append(AdaptedMatrix(strip_peft_prefix(name), module, adapter_name))
    return matrices


@torch.no_grad()
def delta_weight_norms(model: nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """
    `‖ΔW‖_F` of every adapted linear weight of a LoRA or AdaLoRA model, by module name in the base model.

    `ΔW` is peft's own `get_delta_weight` (for AdaLoRA `B (A ⊙ E)` scaled by `alpha / ranknum`, so pruned triplets
    count as zero): the end-of-training picture of where each method put its capacity.
    """
    norms = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            if isinstance(module.get_base_layer(), nn.Linear):
                norms[strip_peft_prefix(name)] = module.get_delta_weight(adapter_name).float().norm().item()
    return norms
