"""
Discovery of the frozen weight matrices that carry the LoRA adapter being trained in a peft model, and the refusal of
every adapter setup on which FW-LoRA's measurement (`‖∇W‖²`) or penalty (`‖ΔW‖²`) would not be exact.
"""

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import UsageError


try:  # peft defines its bitsandbytes LoRA layers only where bitsandbytes is installed (`pip install fw-lora[bnb]`)
    from peft.tuners.lora.bnb import Linear4bit as _LORA_LINEAR_4BIT
except ImportError:
    _LORA_LINEAR_4BIT = None


# peft prefixes every module name with these; users read names as they appear in the base model.
_PEFT_PREFIXES = ("base_model.model.", "module.")

# `LoraConfig` fields whose value, whatever it is, leaves `y = base(x) + s · B A x` with the pretrained `W` in `base`:
# the form under which the Fisher tap measures `‖∇W‖²` exactly and `ΔW = s B A` is the change from the pretrained
# weight. Every other field must keep its default (see [`check_lora_config`]): an option peft adds later is refused
# until it is checked, never assumed to work.
MEASURED_LORA_OPTIONS = frozenset(
    {
        "task_type",
        "peft_type",
        "peft_version",  # the version that saved the adapter
        "megatron_core",  # the module name used only with `megatron_config`, which must stay unset
        "auto_mapping",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "r",
        "target_modules",
        "exclude_modules",
        "lora_alpha",
        "lora_dropout",
        "fan_in_fan_out",  # GPT-2's Conv1D: W stored d_in × d_out, the same ‖∇W‖ and ‖ΔW‖
        "bias",  # which biases train; W and ΔW are unchanged
        "use_rslora",  # scaling α/√r, read from the layer
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",  # per-matrix r and α, read from each layer
        "alpha_pattern",
        "runtime_config",
        "ensure_weight_tying",
        "trainable_token_indices",  # trains embedding rows apart from the adapted matrices
        # Settings of initialisations that are refused anyway unless `init_lora_weights` selects them.
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
    }
)
# `init_lora_weights` values that leave the base weight as pretrained (B = 0, or a random B): anything else (PiSSA,
# OLoRA, EVA, CorDA, LoftQ, LoRA-GA, orthogonal, ...) rewrites `W` to `W − s B₀ A₀` (or a quantised `W`), so that the
# change from the pretrained weight is no longer `s B A` and the frozen matrix is no longer the pretrained one.
MEASURED_INITIALISATIONS = (True, False, "gaussian")


@dataclass(frozen=True)
class AdaptedMatrix:
    """
    A frozen pretrained weight `W` and the LoRA adapter `ΔW = scaling · B A` on it. `W` is an `nn.Linear` weight
    (`d_out × d_in`) or a GPT-2 style `Conv1D` weight (stored `d_in × d_out`, peft's `fan_in_fan_out`): `‖∇W‖_F`,
    `‖ΔW‖_F`, `d_out` and `d_in` do not depend on the layout.

    Args:
        name (`str`): Module name in the base model, e.g. `roberta.encoder.layer.0.attention.self.query`.
        layer (`peft.tuners.lora.Linear`): The peft layer wrapping the frozen layer.
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
        return self.layer.out_features

    @property
    def d_in(self) -> int:
        return self.layer.in_features

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]


def adapter_directory(directory: str, adapter_name: str) -> str:
    """Where peft's `save_pretrained` puts an adapter's files under `directory`: `directory` itself for `"default"`,
    else its subfolder named after the adapter."""
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


def strip_peft_prefix(name: str) -> str:
    """Module name as it appears in the base model (without peft's and DDP's wrapper prefixes)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PEFT_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def matrix_shape(module: nn.Module) -> Optional[tuple[int, int]]:
    """
    `(d_out, d_in)` of a linear layer, whatever its weight's layout: an `nn.Linear` (or a subclass, such as
    bitsandbytes' `Linear4bit`, whose packed weight has another shape) from `out_features`/`in_features`, a GPT-2 style
    `Conv1D` from its `d_in × d_out` weight; `None` for any other module.
    """
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return d_out, d_in
    return None


def _peft_configs(model: nn.Module) -> dict[str, Any]:
    """The adapters' configs of a peft model (also inside DDP, accelerate or `torch.compile` wrappers), or `{}`."""
    for module in model.modules():
        configs = getattr(module, "peft_config", None)
        if isinstance(configs, dict):
            return configs
    return {}


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """Every peft `LoraLayer` of `model` (any adapter, any layer type), by module name in the base model."""
    return [(strip_peft_prefix(name), m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def active_lora_adapter(model: nn.Module, adapter_name: Optional[str] = None) -> str:
    """
    The LoRA adapter that trains: the one adapter active in the model's LoRA layers (`set_adapter`), whatever its name.

    Args:
        model (`nn.Module`): A peft LoRA model, possibly wrapped.
        adapter_name (`str`, *optional*): The adapter expected; refused if it is not the active one.

    Raises:
        `UsageError`: If the model has no LoRA layer, several adapters are active at once, or `adapter_name` is
            not active.
    """
    layers = lora_layers(model)
    if not layers:
        raise UsageError(
            f"The model ({type(model).__name__}) has no LoRA adapter, so there is nothing for LoRA or FW-LoRA to "
            "train. Wrap it with `peft.get_peft_model(model, LoraConfig(...))` (or `fw_trainer.build_peft_model`) "
            "first, or train it with `method='full'`."
        )
    active = list(dict.fromkeys(name for _, layer in layers for name in layer.active_adapters if name in layer.lora_A))
    if len(active) != 1:
        found = ", ".join(repr(name) for name in active) or "none"
        raise UsageError(
            f"FW-LoRA measures and penalises one LoRA adapter, the one that trains, but the model has {len(active)} "
            f"active LoRA adapters ({found}). Activate the adapter to train alone with `model.set_adapter(name)`."
        )
    if adapter_name is not None and adapter_name != active[0]:
        raise UsageError(
            f"The LoRA adapter {adapter_name!r} was asked for, but the adapter that is active (and trains) is "
            f"{active[0]!r}. Activate it with `model.set_adapter({adapter_name!r})`, or leave `adapter_name` unset to "
            "use the active one."
        )
    return active[0]


def check_lora_config(config: Any, adapter_name: str) -> None:
    """
    Refuses an adapter config on which FW-LoRA would not be exact: any type but `LoraConfig`, any initialisation
    that rewrites the base weight (`init_lora_weights` other than `MEASURED_INITIALISATIONS`), and any other field
    outside `MEASURED_LORA_OPTIONS` set away from its default (DoRA, a LoRA bias, QA-LoRA, layer replication, target
    parameters, Megatron layers, and every option peft adds later).

    Raises:
        `UsageError`: Naming the adapter and the option(s), and saying what to do.
    """
    advice = (
        "Train it as a baseline with `method='lora'` (nothing is measured or penalised there), or use a plain LoRA "
        "adapter for FW-LoRA."
    )
    if type(config) is not LoraConfig:
        raise UsageError(
            f"FW-LoRA measures and penalises plain LoRA adapters (`peft.LoraConfig`), but adapter {adapter_name!r} is "
            f"a {type(config).__name__}. {advice}"
        )
    defaults = LoraConfig()
    options = []
    if config.init_lora_weights not in MEASURED_INITIALISATIONS:
        options.append(f"init_lora_weights={config.init_lora_weights!r}")
    for field in dataclasses.fields(config):
        if field.name in MEASURED_LORA_OPTIONS or field.name == "init_lora_weights":
            continue
        value = getattr(config, field.name)
        if value != getattr(defaults, field.name):
            options.append(f"{field.name}={value!r}")
    if options:
        raise UsageError(
            f"FW-LoRA cannot measure or penalise adapter {adapter_name!r} exactly with {', '.join(options)}: its "
            "Fisher tap assumes `y = W x + s·B A x` with the pretrained W, and its penalty that `s·B A` is the change "
            "from the pretrained weight (DoRA rescales each output row by a trained magnitude; PiSSA, OLoRA, EVA, "
            f"CorDA and LoftQ rewrite W). {advice}"
        )


def _unsupported_layer(name: str, layer: LoraLayer, base: nn.Module) -> UsageError:
    return UsageError(
        f"FW-LoRA supports LoRA on `nn.Linear`, GPT-2 style `Conv1D` and bitsandbytes 4-bit linear layers only, but "
        f"`{name}` is a {type(layer).__name__} on a {type(base).__name__}. Remove it from the LoRA targets "
        "(`lora_target_modules`)."
    )


def _check_layer(name: str, layer: LoraLayer, adapter_name: str) -> None:
    """Refuses a LoRA layer on which FW-LoRA would not be exact (see [`find_adapted_matrices`])."""
    base = layer.get_base_layer()
    shape = matrix_shape(base)
    if shape is None:
        raise _unsupported_layer(name, layer, base)
    if type(layer) is _LORA_LINEAR_4BIT:
        pass  # QLoRA: `y = X Wᵀ + s·B A X` with W the dequantised 4-bit weight, whose packed storage is expected
    else:
        weight = base.weight
        expected = shape if not isinstance(base, Conv1D) else shape[::-1]
        if not weight.is_floating_point() or tuple(weight.shape) != expected:
            raise UsageError(
                f"`{name}` ({type(base).__name__}) holds a quantised or packed weight (dtype {weight.dtype}, shape "
                f"{tuple(weight.shape)} for a {shape[0]} x {shape[1]} matrix) of a kind FW-LoRA does not measure "
                "(8-bit bases quantise the activations too, so the layer is not `X Wᵀ`): it is refused rather than "
                "assumed to work. Load the base in 4 bits (bitsandbytes' `load_in_4bit`) or in bf16/fp16/fp32, or "
                "train this model as a `method='lora'` baseline."
            )
        if type(layer) is not LoraLinear:
            raise _unsupported_layer(name, layer, base)
    for option, flags in (("use_dora", layer.use_dora), ("lora_bias", layer.lora_bias)):
        if flags.get(adapter_name, False):
            raise UsageError(
                f"FW-LoRA cannot measure or penalise adapter {adapter_name!r} exactly with {option}=True (at "
                f"`{name}`). Train it as a baseline with `method='lora'`, or use a plain LoRA adapter for FW-LoRA."
            )
    if layer.merged or layer.disable_adapters:
        raise UsageError(
            f"The LoRA adapter at `{name}` is {'merged into the base weight' if layer.merged else 'disabled'}: "
            "nothing of it trains. Unmerge it (`model.unmerge_adapter()`) or enable it before training."
        )


def find_adapted_matrices(model: nn.Module, adapter_name: Optional[str] = None) -> list[AdaptedMatrix]:
    """
    Every weight matrix of `model` that carries the LoRA adapter being trained, in module order, after checking that
    FW-LoRA measures and penalises it exactly.

    Only peft LoRA layers on an `nn.Linear` or a GPT-2 style `Conv1D` count: LayerNorms, embeddings, the LM head and
    the classifier head (trained in full through `modules_to_save`) never take part in the Fisher proxy or the
    penalty. Refused, each with one [`UsageError`] that names the option, adapter or layer: a model without LoRA
    layers; several active adapters, or `adapter_name` not the active one; an adapter config outside
    [`check_lora_config`] (DoRA, PiSSA and the other initialisations that rewrite `W`, ...); a LoRA layer of another
    type (embedding, convolution, a quantised base), a merged or disabled adapter; a weight tied to an embedding.

    Args:
        model (`nn.Module`): A peft LoRA model, possibly wrapped by DDP, accelerate or `torch.compile`.
        adapter_name (`str`, *optional*): The adapter; defaults to the active one ([`active_lora_adapter`]).
    """
    adapter_name = active_lora_adapter(model, adapter_name)
    config = _peft_configs(model).get(adapter_name)
    if config is not None:
        check_lora_config(config, adapter_name)
    # A weight that another module uses too (a tied LM head is the input embedding) has a gradient from both uses,
    # of which the tap on the LoRA layer sees one.
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    matrices = []
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            _check_layer(name, layer, adapter_name)
            if id(layer.get_base_layer().weight) in embeddings:
                raise UsageError(
                    f"`{name}` shares its weight with an embedding (a tied LM head): its gradient comes from both "
                    "uses, and FW-LoRA's tap on the LoRA layer sees only one. Leave it out of the LoRA targets (the "
                    "default targets do), or untie the embeddings (`tie_word_embeddings=False`)."
                )
            matrices.append(AdaptedMatrix(name, layer, adapter_name))
    return matrices


@torch.no_grad()
def delta_weight_norms(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, float]:
    """
    `‖ΔW‖_F` of every adapted linear weight of a LoRA or AdaLoRA model, by module name in the base model, for
    `adapter_name` (by default the active adapter, [`active_lora_adapter`]).

    `ΔW` is peft's own `get_delta_weight` (for AdaLoRA `B (A ⊙ E)` scaled by `alpha / ranknum`, so pruned triplets
    count as zero): the end-of-training picture of where each method put its capacity.
    """
    adapter_name = active_lora_adapter(model, adapter_name)
    norms = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_A and matrix_shape(layer.get_base_layer()) is not None:
            norms[name] = layer.get_delta_weight(adapter_name).float().norm().item()
    return norms
