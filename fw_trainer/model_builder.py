"""Turning a base model into the peft model of a method: target resolution, budget-to-rank solving, a summary."""

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from peft import AdaLoraConfig, LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapted_matrices import matrix_shape, strip_peft_prefix
from .architectures import TARGET_ROLES_BY_MODEL_TYPE, role_pattern
from .arguments import FWLoraArguments, resolve_schedule_steps
from .errors import UsageError


logger = logging.getLogger(__name__)

DEFAULT_LORA_R = 8
# Classification heads: trained in full by every method (peft's `modules_to_save`), never adapted. `classifier` and
# `score` are peft's own SEQ_CLS defaults; `pre_classifier` is DistilBERT's dense layer in front of its classifier.
# Besides these names, every top-level module of a task model outside its backbone is head (`head_module_names`),
# except a language model's output embeddings (`lm_head`): pretrained, frozen like the backbone.
HEAD_MODULE_NAMES = ("classifier", "score", "pre_classifier")
# What peft's SEQ_CLS models add to `modules_to_save` by themselves.
_PEFT_SEQ_CLS_MODULES = ("classifier", "score")
# peft's task type by the transformers class-name suffix of the model (`LlamaForCausalLM` → `CAUSAL_LM`).
_TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",  # GPT-2's `GPT2LMHeadModel`
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


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


def head_module_names(model: nn.Module) -> tuple[str, ...]:
    """
    Names of the modules that make up the task head of `model`: trained in full by every method, never adapted.

    These are `HEAD_MODULE_NAMES` and, for a transformers task model, every top-level module with parameters outside
    its backbone (`model.base_model_prefix`), as in the reference LoRA/AdaLoRA GLUE code, which trains everything
    outside `roberta.`/`deberta.`. That adds DistilBERT's `pre_classifier` and DeBERTa's ContextPooler (`pooler`,
    randomly initialised: pretrained DeBERTa checkpoints have no pooler weights). BERT's pooler belongs to the
    backbone (`bert.pooler`) and stays an ordinary frozen layer. A language model's output embeddings (`lm_head` of a
    causal LM, often tied to the input embeddings) are pretrained, not a task head: they stay frozen, as LoRA practice
    has it (training them would add vocab × hidden parameters, 263M on Llama-3.2-1B, and untie them).
    """
    children = dict(model.named_children())
    backbone = getattr(model, "base_model_prefix", None)
    if not backbone or backbone not in children:
        return HEAD_MODULE_NAMES  # a bare backbone or not a transformers task model
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    lm_head = get_output_embeddings() if callable(get_output_embeddings) else None
    outside = [
        name
        for name, child in children.items()
        if name != backbone and child is not lm_head and next(child.parameters(), None) is not None
    ]
    return HEAD_MODULE_NAMES + tuple(name for name in outside if name not in HEAD_MODULE_NAMES)


def infer_task_type(model: nn.Module) -> Optional[str]:
    """peft's `task_type` for a transformers task model, from its class name (`LlamaForCausalLM` → `"CAUSAL_LM"`,
    `RobertaForSequenceClassification` → `"SEQ_CLS"`), or `None` (a bare backbone, another class)."""
    name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if name.endswith(suffix)), None)


def _is_head(name: str, heads: tuple[str, ...] = HEAD_MODULE_NAMES) -> bool:
    parts = strip_peft_prefix(name).split(".")
    # Modules found outside the backbone count at the top level only; the fixed names anywhere (nested heads).
    return parts[0] in heads or any(part in HEAD_MODULE_NAMES for part in parts)


def resolve_target_modules(model: nn.Module, target_modules: Optional[list[str]] = None) -> list[str]:
    """
    Full names of the linear layers (`nn.Linear`, GPT-2 style `Conv1D`) to adapt, in module order.

    Args:
        model (`nn.Module`): The base model (not yet wrapped by peft).
        target_modules (`list[str]`, *optional*):
            Names or name suffixes (peft's matching: `name == t` or `name.endswith("." + t)`). Each must match at
            least one linear layer outside the classification head (`head_module_names`). Defaults to every role of
            every transformer layer for the architectures (`config.model_type`) of `TARGET_ROLES_BY_MODEL_TYPE`: the
            six of an encoder (query, key, value, attention output, FFN in, FFN out), every attention and FFN
            projection of a decoder (Llama's `q/k/v/o_proj`, `gate/up/down_proj`; GPT-2's `c_attn`, `c_proj`,
            `c_fc`); poolers, heads and the LM head are never default targets.

    Raises:
        `UsageError` (a `ValueError`): If a target matches nothing, or the architecture has no default and no
            targets are given.
    """
    heads = head_module_names(model)
    linear_names = [
        name
        for name, module in model.named_modules()
        if matrix_shape(module) is not None and not _is_head(name, heads)
    ]
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in TARGET_ROLES_BY_MODEL_TYPE:
            raise UsageError(
                f"No default LoRA targets are known for model_type {model_type!r} (known: "
                f"{', '.join(sorted(TARGET_ROLES_BY_MODEL_TYPE))}). Pass the linear layers to adapt explicitly, e.g. "
                "`--lora_target_modules query_proj key_proj value_proj` (names or name suffixes)."
            )
        patterns = {role: role_pattern(suffix) for role, suffix in TARGET_ROLES_BY_MODEL_TYPE[model_type].items()}
        missing = [role for role, pattern in patterns.items() if not any(pattern.search(n) for n in linear_names)]
        if missing:
            raise UsageError(
                f"The default {model_type} LoRA targets found no layer for the role(s) {', '.join(missing)}: this "
                "model does not have the usual layout. Pass the layers to adapt with `--lora_target_modules`."
            )
        return [name for name in linear_names if any(pattern.search(name) for pattern in patterns.values())]

    resolved = []
    for target in target_modules:
        matches = [name for name in linear_names if name == target or name.endswith("." + target)]
        if not matches:
            raise UsageError(
                f"The LoRA target {target!r} matches no linear layer of the model (outside the classification "
                f"head). Linear layers look like: {', '.join(linear_names[:6])}, ... Fix `lora_target_modules`."
            )
        resolved += [name for name in matches if name not in resolved]
    return [name for name in linear_names if name in set(resolved)]


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
        `UsageError` (a `ValueError`): If even rank 1 is closer to zero than to the budget, i.e. the budget is
            too small.
    """
    modules = dict(model.named_modules())
    params_per_rank = sum(sum(matrix_shape(modules[name])) for name in target_modules)
    base_params = count_base_params(model)
    exact = budget_percent / 100.0 * base_params / params_per_rank
    rank = math.floor(exact + 0.5)
    if rank < 1:
        raise UsageError(
            f"A budget of {budget_percent}% of {base_params:,} base parameters is too small for rank 1 on "
            f"{len(target_modules)} matrices: rank 1 already costs {params_per_rank:,} parameters "
            f"({100.0 * params_per_rank / base_params:.4f}%). Raise `lora_budget` or adapt fewer modules."
        )
    return rank


def _check_rank_fits(model: nn.Module, targets: list[str], rank: int) -> None:
    """
    Refuses a LoRA rank above a target matrix's smaller side: `ΔW = B A` cannot have a rank above `min(d_in, d_out)`,
    so the extra rank only adds parameters (and skews a parameter budget).

    Raises:
        `UsageError`: Naming the first matrix too small and its shape.
    """
    for name, module in model.named_modules():
        shape = matrix_shape(module) if name in targets else None
        if shape is not None and rank > min(shape):
            d_out, d_in = shape
            raise UsageError(
                f"A LoRA rank of {rank} does not fit {name} ({d_out} x {d_in}): the update B A of a matrix cannot "
                f"have a rank above its smaller side, {min(d_out, d_in)}. Pass a --lora_r (and, for AdaLoRA, an "
                f"initial rank --adalora_init_r_ratio x r) of at most {min(d_out, d_in)}, or leave that matrix out of "
                "--lora_target_modules."
            )


def build_peft_model(
    model: nn.Module,
    fw_args: FWLoraArguments,
    num_training_steps: Optional[int] = None,
    task_type: Optional[str] = None,
) -> tuple[nn.Module, AdapterSummary]:
    """
    Wraps `model` for `fw_args.method` and describes the result.

    `lora` and `fw_lora` get the same `LoraConfig` (so they compare like for like); `adalora` gets an `AdaLoraConfig`
    whose final average rank is the same `r` and initial rank `ceil(adalora_init_r_ratio · r)`; `full` leaves the model
    as it is, every parameter trainable. Every method trains the whole task head (`head_module_names`): peft's own
    `modules_to_save` (`classifier`, `score`) plus the rest of it, e.g. DistilBERT's `pre_classifier` and
    DeBERTa's `pooler`. A causal LM has no task head: only the adapters train (its `lm_head` stays frozen and tied).

    Args:
        model (`nn.Module`): A transformers task model: a classifier (encoder or decoder) or a causal LM.
        fw_args ([`FWLoraArguments`]): The method's arguments.
        num_training_steps (`int`, *optional*):
            AdaLoRA's `total_step`. [`AdaLoraAllocationCallback`] replaces it with the Trainer's real count when
            training begins, so it may be left out.
        task_type (`str`, *optional*):
            peft task type (decides `modules_to_save`); defaults to the model's ([`infer_task_type`]:
            `"SEQ_CLS"` for a `...ForSequenceClassification`, `"CAUSAL_LM"` for a `...ForCausalLM`).

    Returns:
        `tuple[nn.Module, AdapterSummary]`: The model to train and its summary.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    base_params = count_base_params(model)
    heads = head_module_names(model)
    if fw_args.method == "full":
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        head = sum(p.numel() for name, p in model.named_parameters() if _is_head(name, heads))
        summary = AdapterSummary("full", model_type, base_params=base_params, head_params=head)
        summary.trainable_params = trainable
        return model, summary

    targets = resolve_target_modules(model, fw_args.lora_target_modules)
    task_type = task_type if task_type is not None else infer_task_type(model)
    if fw_args.lora_budget is not None:
        rank = rank_for_budget(model, targets, fw_args.lora_budget)
    else:
        rank = fw_args.lora_r or DEFAULT_LORA_R

    init_rank = math.ceil(fw_args.adalora_init_r_ratio * rank) if fw_args.method == "adalora" else None
    _check_rank_fits(model, targets, init_rank or rank)

    # peft matches `modules_to_save` as plain name suffixes: its `classifier` default catches DistilBERT's
    # `pre_classifier` only by accident, and nothing catches DeBERTa's `pooler`. Name the rest of the head explicitly.
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    extra_heads = [name for name in heads if name in present and name not in _PEFT_SEQ_CLS_MODULES]
    modules = dict(model.named_modules())
    common = dict(
        task_type=task_type,
        target_modules=targets,
        # GPT-2's `Conv1D` stores W as d_in × d_out (peft would switch this on per layer, with a warning each).
        fan_in_fan_out=all(isinstance(modules[name], Conv1D) for name in targets),
        lora_alpha=fw_args.lora_alpha,
        lora_dropout=fw_args.lora_dropout,
        modules_to_save=extra_heads or None,
    )
    if fw_args.method == "adalora":
        total_steps = num_training_steps or 1_000_000  # placeholder; the callback sets the real count
        config = AdaLoraConfig(
            init_r=init_rank,
            target_r=rank,
            tinit=resolve_schedule_steps(fw_args.adalora_tinit, total_steps),
            tfinal=resolve_schedule_steps(fw_args.adalora_tfinal, total_steps),
            deltaT=fw_args.adalora_delta_t,
            beta1=fw_args.adalora_beta1,
            beta2=fw_args.adalora_beta2,
            orth_reg_weight=fw_args.adalora_orth_reg_weight,
            total_step=total_steps,
            **common,
        )
    else:
        config = LoraConfig(
            r=rank,
            use_dora=fw_args.lora_use_dora,
            use_rslora=fw_args.lora_use_rslora,
            init_lora_weights=fw_args.init_lora_weights,
            **common,
        )
    peft_model = get_peft_model(model, config)

    adapter_params = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)
    head_params = sum(
        p.numel() for name, p in peft_model.named_parameters() if p.requires_grad and _is_head(name, heads)
    )
    summary = AdapterSummary(
        method=fw_args.method,
        model_type=model_type,
        target_modules=targets,
        rank=rank,
        init_rank=init_rank,
        lora_alpha=fw_args.lora_alpha,
        base_params=base_params,
        adapter_params=adapter_params,
        head_params=head_params,
        trainable_params=sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        requested_budget_percent=fw_args.lora_budget,
    )
    return peft_model, summary
