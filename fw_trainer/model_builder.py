"""Turning a base model into the peft model of a method: target resolution, budget-to-rank solving, a summary."""

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

from peft import AdaLoraConfig, LoraConfig, get_peft_model
from torch import nn

from .adalora_callback import resolve_schedule_steps
from .arguments import FWLoraArguments


logger = logging.getLogger(__name__)

DEFAULT_LORA_R = 8
# Classification heads: trained in full by every method (peft's `modules_to_save` for SEQ_CLS), never adapted.
HEAD_MODULE_NAMES = ("classifier", "score")

_BERT_STYLE_ROLES = {
    "query": r"attention\.self\.query",
    "key": r"attention\.self\.key",
    "value": r"attention\.self\.value",
    "attention_output": r"attention\.output\.dense",
    "ffn_in": r"intermediate\.dense",
    "ffn_out": r"(?<!attention\.)output\.dense",
}
# Per `config.model_type`: role → regex that the module name must end with. The six roles of AdaLoRA's setup.
ENCODER_TARGET_ROLES = {
    model_type: _BERT_STYLE_ROLES
    for model_type in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "data2vec-text", "ernie")
}

_LAYER_INDEX = re.compile(r"\.layer\.(\d+)\.")


@dataclass
class AdapterSummary:
    """What a run adapts and trains; logged at the start of every run."""

    method: str
    model_type: str
    target_modules: list[str] = field(default_factory=list)
    rank: Optional[int] = None
    init_rank: Optional[int] = None
    lora_alpha: Optional[float] = None
    base_params: int = 0
    adapter_params: int = 0
    head_params: int = 0
    trainable_params: int = 0
    requested_budget_percent: Optional[float] = None

    @property
    def adapter_percent(self) -> float:
        """Adapter parameters as a percentage of the base model's."""
        return 100.0 * self.adapter_params / self.base_params

    @property
    def head_percent(self) -> float:
        return 100.0 * self.head_params / self.base_params

    def to_dict(self) -> dict:
        return {**asdict(self), "adapter_percent": self.adapter_percent, "head_percent": self.head_percent}

    def format(self) -> str:
        lines = [
            f"method: {self.method} (model_type {self.model_type})",
            f"adapted matrices: {len(self.target_modules)}",
        ]
        if self.rank is not None:
            rank = f"{self.init_rank} -> {self.rank} (AdaLoRA)" if self.init_rank else str(self.rank)
            lines.append(f"rank: {rank}, lora_alpha: {self.lora_alpha}")
        if self.requested_budget_percent is not None:
            lines.append(f"requested budget: {self.requested_budget_percent:.3f}% of base parameters")
        lines += [
            f"base parameters: {self.base_params:,}",
            f"adapter parameters: {self.adapter_params:,} ({self.adapter_percent:.3f}% of base)",
            f"head parameters: {self.head_params:,} ({self.head_percent:.3f}% of base, trained by every method)",
            f"trainable parameters: {self.trainable_params:,}",
        ]
        lines += [f"  {name}" for name in self.target_modules]
        return "\n".join(lines)


def _is_head(name: str) -> bool:
    return any(part in HEAD_MODULE_NAMES for part in name.split("."))


def resolve_target_modules(model: nn.Module, target_modules: Optional[list[str]] = None) -> list[str]:
    """
    Full names of the linear layers to adapt, in module order.

    Args:
        model (`nn.Module`): The base model (not yet wrapped by peft).
        target_modules (`list[str]`, *optional*):
            Names or name suffixes (peft's matching: `name == t` or `name.endswith("." + t)`). Each must match at
            least one linear layer outside the classification head. Defaults to the six roles of every encoder layer
            (query, key, value, attention output, FFN in, FFN out) for the architectures of `ENCODER_TARGET_ROLES`.

    Raises:
        `ValueError`: If a target matches nothing, or the architecture has no default and no targets are given.
    """
    linear_names = [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and not _is_head(name)
    ]
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in ENCODER_TARGET_ROLES:
            raise ValueError(
                f"No default LoRA targets are known for model_type {model_type!r} (known: "
                f"{', '.join(sorted(ENCODER_TARGET_ROLES))}). Pass the linear layers to adapt explicitly, e.g. "
                "`--lora_target_modules query_proj key_proj value_proj` (names or name suffixes)."
            )
        roles = ENCODER_TARGET_ROLES[model_type]
        missing = [role for role, suffix in roles.items() if not any(re.search(suffix + "$", n) for n in linear_names)]
        if missing:
            raise ValueError(
                f"The default {model_type} LoRA targets found no layer for the role(s) {', '.join(missing)}: this "
                "model does not have the usual layout. Pass the layers to adapt with `--lora_target_modules`."
            )
        pattern = re.compile("(" + "|".join(roles.values()) + r")$")
        return [name for name in linear_names if pattern.search(name)]

    resolved = []
    for target in target_modules:
        matches = [name for name in linear_names if name == target or name.endswith("." + target)]
        if not matches:
            raise ValueError(
                f"The LoRA target {target!r} matches no linear layer of the model (outside the classification "
                f"head). Linear layers look like: {', '.join(linear_names[:6])}, ... Fix `lora_target_modules`."
            )
        resolved += [name for name in matches if name not in resolved]
    return [name for name in linear_names if name in set(resolved)]


def layer_index(module_name: str) -> Optional[int]:
    """The encoder layer a module belongs to (`...layer.3.attention...` → 3), or `None`."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def count_base_params(model: nn.Module) -> int:
    """
    Parameters of the model before adapters, task head included (roberta-base for classification: 124.6M): the
    quantity that budgets are a percentage of. The head's share is reported separately in the summary.
    """
    return sum(p.numel() for p in model.parameters())


def rank_for_budget(model: nn.Module, target_modules: list[str], budget_percent: float) -> int:
    """
    The uniform integer LoRA rank whose adapter size `r · Σ(d_in + d_out)` is nearest to `budget_percent` % of the
    base model's parameters (ties round up).

    Raises:
        `ValueError`: If even rank 1 is closer to zero than to the budget, i.e. the budget is too small.
    """
    modules = dict(model.named_modules())
    params_per_rank = sum(modules[name].in_features + modules[name].out_features for name in target_modules)
    base_params = count_base_params(model)
    exact = budget_percent / 100.0 * base_params / params_per_rank
    rank = math.floor(exact + 0.5)
    if rank < 1:
        raise ValueError(
            f"A budget of {budget_percent}% of {base_params:,} base parameters is too small for rank 1 on "
            f"{len(target_modules)} matrices: rank 1 already costs {params_per_rank:,} parameters "
            f"({100.0 * params_per_rank / base_params:.4f}%). Raise `lora_budget` or adapt fewer modules."
        )
    return rank


def build_peft_model(
    model: nn.Module,
    args: FWLoraArguments,
    num_training_steps: Optional[int] = None,
    task_type: str = "SEQ_CLS",
) -> tuple[nn.Module, AdapterSummary]:
    """
    Wraps `model` for `args.method` and describes the result.

    `lora` and `fw_lora` get the same `LoraConfig` (so they compare like for like); `adalora` gets an `AdaLoraConfig`
    whose final average rank is the same `r` and initial rank `ceil(adalora_init_r_ratio · r)`; `full` leaves the model
    as it is, every parameter trainable.

    Args:
        model (`nn.Module`): A transformers model with a classification head.
        args ([`FWLoraArguments`]): The method's arguments.
        num_training_steps (`int`, *optional*):
            AdaLoRA's `total_step`. [`AdaLoraAllocationCallback`] replaces it with the Trainer's real count when
            training begins, so it may be left out.
        task_type (`str`, *optional*, defaults to `"SEQ_CLS"`): peft task type (decides `modules_to_save`).

    Returns:
        `tuple[nn.Module, AdapterSummary]`: The model to train and its summary.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    base_params = count_base_params(model)
    if args.method == "full":
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        head = sum(p.numel() for name, p in model.named_parameters() if _is_head(name))
        summary = AdapterSummary("full", model_type, base_params=base_params, head_params=head)
        summary.trainable_params = trainable
        return model, summary

    targets = resolve_target_modules(model, args.lora_target_modules)
    if args.lora_budget is not None:
        rank = rank_for_budget(model, targets, args.lora_budget)
    else:
        rank = args.lora_r or DEFAULT_LORA_R

    common = dict(
        task_type=task_type, target_modules=targets, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout
    )
    init_rank = None
    if args.method == "adalora":
        init_rank = math.ceil(args.adalora_init_r_ratio * rank)
        total_steps = num_training_steps or 1_000_000  # placeholder; the callback sets the real count
        config = AdaLoraConfig(
            init_r=init_rank,
            target_r=rank,
            tinit=resolve_schedule_steps(args.adalora_tinit, total_steps),
            tfinal=resolve_schedule_steps(args.adalora_tfinal, total_steps),
            deltaT=args.adalora_delta_t,
            beta1=args.adalora_beta1,
            beta2=args.adalora_beta2,
            orth_reg_weight=args.adalora_orth_reg_weight,
            total_step=total_steps,
            **common,
        )
    else:
        config = LoraConfig(r=rank, **common)
    peft_model = get_peft_model(model, config)

    adapter_params = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)
    head_params = sum(p.numel() for name, p in peft_model.named_parameters() if p.requires_grad and _is_head(name))
    summary = AdapterSummary(
        method=args.method,
        model_type=model_type,
        target_modules=targets,
        rank=rank,
        init_rank=init_rank,
        lora_alpha=args.lora_alpha,
        base_params=base_params,
        adapter_params=adapter_params,
        head_params=head_params,
        trainable_params=sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        requested_budget_percent=args.lora_budget,
    )
    return peft_model, summary
