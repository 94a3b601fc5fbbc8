"""Command-line arguments of the fine-tuning method (LoRA, AdaLoRA, FW-LoRA or full fine-tuning): the one place of
their defaults, allowed values and checks, which the estimator and the penalty read too."""

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, NamedTuple, Optional


METHODS = ("lora", "adalora", "fw_lora", "iw_lora", "full")
# The methods that measure importances and penalise the adapters by them.
FISHER_WEIGHTED_METHODS = ("fw_lora", "iw_lora")
NORMALIZATIONS = ("sum", "max")
PENALTIES = ("delta", "factors")
STATISTICS = ("sq_norm", "norm")
AVERAGES = ("ema", "mean")
WARMUP_MODES = ("train", "calibrate")
ESTIMATORS = ("auto", "exact", "sketch")
# peft's `init_lora_weights` values a run can ask for without extra data (EVA, CorDA and LoftQ need their own setup).
LORA_INITIALISATIONS = ("true", "false", "gaussian", "pissa", "olora")
# Those that rewrite the base weight (`W − s B₀A₀`): FW-LoRA's measurement and penalty assume the pretrained `W`.
BASE_REWRITING_INITIALISATIONS = ("pissa", "olora")
# What `method="iw_lora"` (the earlier IW-LoRA proposal) sets, where the user leaves an option unset.
IW_LORA_PRESET = {"fw_statistic": "norm", "fw_average": "mean", "fw_warmup_mode": "calibrate", "fw_warmup_steps": 200}
FW_LORA_DEFAULTS = {"fw_statistic": "sq_norm", "fw_average": "ema", "fw_warmup_mode": "train", "fw_warmup_steps": 500}


class Domain(NamedTuple):
    """The numbers an option may take, and how a message says it (`text`): an interval, open or closed at each end,
    integers only if `integer`. An infinite end is always open: NaN and infinities are refused wherever a finite
    number is meant."""

    text: str
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.integer and not float(value).is_integer():
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open or math.isinf(self.high) else value <= self.high
        return above and below


# The numeric options' domains, by field name.
DOMAINS = {
    "lora_r": Domain("a positive integer", 1, integer=True),
    "lora_budget": Domain("a percentage in (0, 100]", 0, 100, low_open=True),
    "lora_alpha": Domain("greater than 0", 0, low_open=True),
    "lora_dropout": Domain("in [0, 1)", 0, 1, high_open=True),
    "adalora_init_r_ratio": Domain("at least 1", 1),
    "adalora_tinit": Domain(">= 0", 0),
    "adalora_tfinal": Domain(">= 0", 0),
    "adalora_delta_t": Domain(">= 1", 1, integer=True),
    "adalora_beta1": Domain("in (0, 1)", 0, 1, low_open=True, high_open=True),
    "adalora_beta2": Domain("in (0, 1)", 0, 1, low_open=True, high_open=True),
    "adalora_orth_reg_weight": Domain("greater than or equal to 0", 0),
    "fw_lambda": Domain("greater than or equal to 0", 0),
    "fw_warmup_steps": Domain("greater than or equal to 0", 0, integer=True),
    "fw_sketch_probes": Domain("a positive integer", 1, integer=True),
    "fw_ema_decay": Domain("in (0, 1)", 0, 1, low_open=True, high_open=True),
    "fw_power": Domain("greater than or equal to 0", 0),
    "fw_shuffle_seed": Domain("an integer in [0, 2**63)", 0, 2**63, high_open=True, integer=True),
    "fw_exempt_top": Domain("a non-negative integer", 0, integer=True),
}

# The options added after checkpoints were first written, with the value that does what the code before them did: a
# checkpoint whose `fw_run_identity.json` and `fw_importance.json` lack one was trained with that value, and resumes as
# such rather than being refused for a key it could not have.
ADDED_OPTIONS = {"fw_shuffle_seed": None, "fw_exempt_top": 0}


@dataclass
class FWLoraArguments:
    r"""
    Arguments of the fine-tuning method, parsed by [`~transformers.HfArgumentParser`] next to
    [`~transformers.TrainingArguments`]. Every field is prefixed (`lora_`, `adalora_`, `fw_`) so that it never
    collides with a `TrainingArguments` flag.

    Args:
        method (`str`, *optional*, defaults to `"fw_lora"`):
            One of `"lora"` (plain LoRA), `"adalora"` (peft's AdaLoRA), `"fw_lora"` (Fisher-weighted LoRA),
            `"iw_lora"` (the IW-LoRA preset: `fw_statistic="norm"`, `fw_average="mean"`, `fw_warmup_mode="calibrate"`,
            `fw_warmup_steps=200`, each overridable) or `"full"` (full fine-tuning, as a reference).
        lora_r (`int`, *optional*):
            LoRA rank of every adapted matrix (AdaLoRA: the final average rank `target_r`). Defaults to 8 unless
            `lora_budget` is given.
        lora_budget (`float`, *optional*):
            Adapter parameter budget as a percentage of the base model's parameters (e.g. `0.2` for 0.2 %). The
            nearest uniform integer rank is used; mutually exclusive with `lora_r`.
        lora_alpha (`float`, *optional*, defaults to `16`):
            LoRA scaling numerator; the scaling is `lora_alpha / r`.
        lora_dropout (`float`, *optional*, defaults to `0.0`):
            Dropout on the LoRA branch input.
        lora_target_modules (`list[str]`, *optional*):
            Module names (or name suffixes) to adapt. Defaults to every role of every layer of the architecture: the
            six of an encoder (query, key, value, attention output, FFN in, FFN out), a decoder's attention and FFN
            projections.
        lora_use_dora (`bool`, *optional*, defaults to `False`):
            peft's DoRA (`--use_dora`): a LoRA baseline only (`method="lora"`); FW-LoRA and IW-LoRA refuse it.
        lora_use_rslora (`bool`, *optional*, defaults to `False`):
            peft's rsLoRA scaling `lora_alpha / sqrt(r)` (`--use_rslora`), for every LoRA method.
        lora_init_weights (`str`, *optional*, defaults to `"true"`):
            peft's `init_lora_weights` (`--init_lora_weights`): `"true"` (B = 0), `"false"`, `"gaussian"`, or
            `"pissa"`/`"olora"`, which rewrite the base weight and are therefore a LoRA baseline only.
        adalora_init_r_ratio (`float`, *optional*, defaults to `1.5`):
            AdaLoRA's initial rank is `ceil(adalora_init_r_ratio * lora_r)`.
        adalora_tinit (`float`, *optional*, defaults to `0.1`):
            AdaLoRA steps before rank pruning starts; a value below 1 is a fraction of the total optimizer steps.
        adalora_tfinal (`float`, *optional*, defaults to `0.2`):
            AdaLoRA steps at the end with a fixed rank pattern; a value below 1 is a fraction of the total steps.
        adalora_delta_t (`int`, *optional*, defaults to `10`):
            Steps between two AdaLoRA rank re-allocations.
        adalora_beta1 (`float`, *optional*, defaults to `0.85`):
            EMA decay of AdaLoRA's sensitivity.
        adalora_beta2 (`float`, *optional*, defaults to `0.85`):
            EMA decay of AdaLoRA's uncertainty.
        adalora_orth_reg_weight (`float`, *optional*, defaults to `0.5`):
            Weight of AdaLoRA's orthogonality regulariser.
        fw_lambda (`float`, *optional*, defaults to `1e-4`):
            Weight λ of the Fisher-weighted penalty `λ Σ_m (1 − I_m) ‖ΔW_m‖²`.
        fw_warmup_steps (`int`, *optional*, defaults to `500` (`iw_lora`: `200`)):
            Number K of optimizer steps during which the statistic is accumulated. Not to be confused with the
            learning-rate warm-up `warmup_steps` of `TrainingArguments`.
        fw_warmup_mode (`str`, *optional*, defaults to `"train"` (`iw_lora`: `"calibrate"`)):
            `"train"`: the K steps train plain LoRA while measuring (FW-LoRA). `"calibrate"`: K extra forward/backward
            steps with nothing updated (no optimizer or scheduler step, not counted as training steps) before
            training starts (IW-LoRA).
        fw_statistic (`str`, *optional*, defaults to `"sq_norm"` (`iw_lora`: `"norm"`)):
            Per-micro-batch statistic: `"sq_norm"` `‖∇W‖_F²` (FW-LoRA's Fisher proxy) or `"norm"` `‖∇W‖_F` (IW-LoRA).
        fw_average (`str`, *optional*, defaults to `"ema"` (`iw_lora`: `"mean"`)):
            Average over steps: `"ema"` (decay `fw_ema_decay`, bias-corrected) or `"mean"` (plain running mean).
        fw_estimator (`str`, *optional*, defaults to `"auto"`):
            `"exact"`: `‖Gᵀ X‖_F²` with one GEMM per adapted matrix and micro-batch; it keeps every adapted layer's
            input until the backward pass (+11 % peak memory on roberta-base in bf16). `"sketch"`: the unbiased
            estimate `‖(X Z)ᵀ G‖_F² / k` with `k` fresh Gaussian probes `Z` per micro-batch, O(N·(d_in + d_out)·k)
            instead of O(N·d_in·d_out), and only `X Z` kept for the backward pass (LoRA's peak memory). `"auto"`: the
            sketch when the adapters live on an accelerator (GPU), where memory and kernel launches are what a step
            costs, and the exact value on the CPU. The estimator used is logged and written to `fw_importance.json`.
        fw_sketch_probes (`int`, *optional*, defaults to `8`):
            Number `k` of probes of the sketched estimator.
        fw_ema_decay (`float`, *optional*, defaults to `0.98`):
            Decay α of the exponential moving average.
        fw_power (`float`, *optional*, defaults to `1.0`):
            Exponent β of the penalty weights `(1 − I_m)^β`; β = 1 is FW-LoRA's form, β = 0 gives every matrix weight 1
            (the same penalty with uniform weights: a control).
        fw_shuffle_seed (`int`, *optional*):
            A control: the frozen importances are permuted across the adapted matrices with this seed before the
            weights are computed, so that the penalty has FW-LoRA's distribution of weights, assigned at random. Works
            with either normalisation; recorded in `fw_importance.json` (whose `importance` entries are then the
            permuted ones, `fisher` the measured ones).
        fw_exempt_top (`int`, *optional*, defaults to `0`):
            A control: the `k` adapted matrices with the largest measured `F` get penalty weight 0 (they are not
            penalised), whatever their other weight; ties go to the first matrix in model order. With `fw_power=0`
            every other matrix keeps weight 1: the "top-k exempt" control, which separates "one matrix left free" from
            a graded Fisher weighting (with `max` normalisation FW-LoRA itself gives its top matrix weight 0). Must be
            smaller than the number of adapted matrices; cannot be combined with `fw_shuffle_seed`. Recorded in
            `fw_importance.json` (`exempt_top`, and each matrix's `penalty_weight`).
        fw_normalization (`str`, *optional*, defaults to `"sum"`):
            `"sum"`: `I = F / ΣF` (the paper's); `"max"`: `I = F / max F`, which spreads the weights over [0, 1].
        fw_penalty (`str`, *optional*, defaults to `"delta"`):
            `"delta"`: the exact `‖scaling · B A‖_F²`; `"factors"`: the surrogate `‖A‖_F² + ‖B‖_F²` (an ablation).
    """

    method: str = field(default="fw_lora", metadata={"help": "Fine-tuning method.", "choices": METHODS})
    lora_r: Optional[int] = field(
        default=None,
        metadata={"help": "LoRA rank (AdaLoRA: final average rank). Defaults to 8 unless --lora_budget is given."},
    )
    lora_budget: Optional[float] = field(
        default=None,
        metadata={"help": "Adapter budget in %% of the base model's parameters; picks the nearest uniform rank."},
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scaling = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch input."})
    lora_target_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules to adapt (names or suffixes). Default: q, k, v, attn-out, FFN in, FFN out."},
    )
    lora_use_dora: bool = field(
        default=False, metadata={"help": "DoRA (peft's use_dora); method lora only.", "aliases": ["--use_dora"]}
    )
    lora_use_rslora: bool = field(
        default=False,
        metadata={"help": "rsLoRA scaling alpha / sqrt(r) (peft's use_rslora).", "aliases": ["--use_rslora"]},
    )
    lora_init_weights: str = field(
        default="true",
        metadata={
            "help": "peft's init_lora_weights; pissa and olora rewrite the base weight: method lora only.",
            "choices": LORA_INITIALISATIONS,
            "aliases": ["--init_lora_weights"],
        },
    )
    adalora_init_r_ratio: float = field(default=1.5, metadata={"help": "AdaLoRA initial rank = ceil(ratio * lora_r)."})
    adalora_tinit: float = field(
        default=0.1, metadata={"help": "AdaLoRA steps before pruning; < 1 means a fraction of the total steps."}
    )
    adalora_tfinal: float = field(
        default=0.2, metadata={"help": "AdaLoRA final steps with fixed ranks; < 1 means a fraction of the total."}
    )
    adalora_delta_t: int = field(default=10, metadata={"help": "Steps between AdaLoRA rank re-allocations."})
    adalora_beta1: float = field(default=0.85, metadata={"help": "AdaLoRA sensitivity EMA decay."})
    adalora_beta2: float = field(default=0.85, metadata={"help": "AdaLoRA uncertainty EMA decay."})
    adalora_orth_reg_weight: float = field(default=0.5, metadata={"help": "AdaLoRA orthogonality loss weight."})
    fw_lambda: float = field(default=1e-4, metadata={"help": "Weight of the Fisher-weighted penalty."})
    fw_warmup_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "Steps K of statistic accumulation, default 500 (iw_lora: 200). Not the learning-rate "
            "--warmup_steps."
        },
    )
    fw_warmup_mode: Optional[str] = field(
        default=None,
        metadata={
            "help": "train: measure while training LoRA (default); calibrate: K extra steps updating nothing, before "
            "training (iw_lora's default).",
            "choices": WARMUP_MODES,
        },
    )
    fw_statistic: Optional[str] = field(
        default=None,
        metadata={
            "help": "sq_norm: ||grad W||^2 (default); norm: ||grad W|| (iw_lora's default).",
            "choices": STATISTICS,
        },
    )
    fw_average: Optional[str] = field(
        default=None,
        metadata={
            "help": "ema: moving average (default); mean: running mean (iw_lora's default).",
            "choices": AVERAGES,
        },
    )
    fw_estimator: str = field(
        default="auto",
        metadata={
            "help": "exact: one GEMM per matrix, keeps each adapted layer's input; sketch: unbiased estimate from "
            "--fw_sketch_probes probes at LoRA's memory; auto (default): sketch on a GPU, exact on the CPU.",
            "choices": ESTIMATORS,
        },
    )
    fw_sketch_probes: int = field(default=8, metadata={"help": "Random probes k of the sketched estimator."})
    fw_ema_decay: float = field(default=0.98, metadata={"help": "Decay of the moving average."})
    fw_power: float = field(
        default=1.0,
        metadata={
            "help": "Exponent beta of the penalty weights (1 - I)^beta; 0 gives every matrix weight 1 (uniform)."
        },
    )
    fw_shuffle_seed: Optional[int] = field(
        default=None,
        metadata={
            "help": "A control: permute the frozen importances across matrices with this seed before the weights are "
            "computed (the same weights, assigned at random). Default: no permutation."
        },
    )
    fw_exempt_top: int = field(
        default=0,
        metadata={
            "help": "A control: the k matrices with the largest measured F get penalty weight 0 (unpenalised); with "
            "--fw_power 0 the others keep weight 1 (the top-k exempt control). Default 0: none exempt."
        },
    )
    fw_normalization: str = field(
        default="sum",
        metadata={
            "help": "Importance normalisation: sum (I = F / sum F, paper) or max (F / max F).",
            "choices": NORMALIZATIONS,
        },
    )
    fw_penalty: str = field(
        default="delta",
        metadata={
            "help": "Penalty: delta (exact ||scaling * B A||_F^2) or factors (||A||^2 + ||B||^2, a surrogate).",
            "choices": PENALTIES,
        },
    )

    def __post_init__(self):
        check_option("method", self.method)
        # Options left unset take the method's value: the IW-LoRA preset or FW-LoRA's defaults.
        defaults = IW_LORA_PRESET if self.method == "iw_lora" else FW_LORA_DEFAULTS
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for option in fields(self):
            value = getattr(self, option.name)
            if value is not None and option.name != "method":
                setattr(self, option.name, check_option(option.name, value))
        if self.lora_r is not None and self.lora_budget is not None:
            raise ValueError(
                "`lora_r` and `lora_budget` are mutually exclusive: pass an explicit rank or a budget, not both."
            )
        if isinstance(self.lora_target_modules, str):
            # One name given as a string (`lora_target_modules="query"`, or `query` in a YAML file) is that one
            # target, not its letters.
            self.lora_target_modules = [self.lora_target_modules]
        if self.lora_target_modules is not None and len(self.lora_target_modules) == 0:
            raise ValueError("`lora_target_modules` should name at least one module, but an empty list was passed.")
        if self.fw_exempt_top and self.fw_shuffle_seed is not None:
            raise ValueError(
                "`fw_exempt_top` and `fw_shuffle_seed` are two controls of one question (are the weights on the right "
                "matrices?) and together would exempt a matrix by its measured F while assigning the other weights "
                "at random: a run that answers neither. Pass one of them."
            )
        self._check_lora_variant()

    def _check_lora_variant(self) -> None:
        """LoRA variants are options of LoRA's adapter: none for AdaLoRA or full fine-tuning, and, for FW-LoRA and
        IW-LoRA, only those whose measurement and penalty are exact (see `fw_trainer.adapted_matrices`)."""
        variants = [
            f"--{name}"
            for name, chosen in (
                ("use_dora", self.lora_use_dora),
                ("use_rslora", self.lora_use_rslora),
                (f"init_lora_weights {self.lora_init_weights}", self.lora_init_weights != "true"),
            )
            if chosen
        ]
        if variants and self.method in ("adalora", "full"):
            raise ValueError(
                f"{', '.join(variants)} set(s) up a LoRA adapter, but method {self.method!r} has none of LoRA's: use "
                "it with --method lora (or fw_lora, iw_lora where FW-LoRA measures it exactly)."
            )
        unmeasured = [
            variant
            for variant in variants
            if variant == "--use_dora" or variant.split()[-1] in BASE_REWRITING_INITIALISATIONS
        ]
        if unmeasured and self.uses_fisher_weights:
            raise ValueError(
                f"FW-LoRA and IW-LoRA cannot measure or penalise an adapter with {', '.join(unmeasured)} exactly "
                "(DoRA rescales each output row by a trained magnitude; PiSSA and OLoRA rewrite the base weight). "
                "Run it as a baseline with --method lora."
            )

    @property
    def init_lora_weights(self) -> Any:
        """`lora_init_weights` as peft's `init_lora_weights` takes it (`True`, `False` or the method's name)."""
        return {"true": True, "false": False}.get(self.lora_init_weights, self.lora_init_weights)

    @property
    def uses_fisher_weights(self) -> bool:
        """Whether the method measures importances and penalises adapters by them (FW-LoRA and IW-LoRA)."""
        return self.method in FISHER_WEIGHTED_METHODS

    @property
    def uses_lora(self) -> bool:
        """Whether the method trains low-rank adapters (every method but full fine-tuning)."""
        return self.method != "full"


def resolve_schedule_steps(value: float, total_steps: int) -> int:
    """A step count given either as an absolute number (>= 1) or as a fraction (< 1) of `total_steps`."""
    return int(value) if value >= 1 else int(math.floor(value * total_steps))


def default_of(name: str) -> Any:
    """The default of the [`FWLoraArguments`] field `name`; for an option whose default depends on the method,
    FW-LoRA's. The estimator and the penalty take their keyword defaults from here, so no default is written twice."""
    if name in FW_LORA_DEFAULTS:
        return FW_LORA_DEFAULTS[name]
    option = _FIELDS[name]
    return option.default if option.default is not MISSING else option.default_factory()


def check_option(name: str, value: Any, argument: Optional[str] = None) -> Any:
    """
    Checks one value of the [`FWLoraArguments`] field `name` against its allowed values (the field's `choices`) or its
    [`Domain`]; the dataclass and the classes and functions that take the same option as a keyword argument (e.g.
    [`FisherEstimator`] takes `fw_ema_decay` as `ema_decay`) all check it here, and use the value it returns.
    `argument` is the name the message gives the value (the keyword argument of such a class), by default `name`.

    Returns:
        The value, as an `int` where the option takes integers and a whole float was passed (`4.0` from a Python
        caller or `HfArgumentParser.parse_dict`): kept a float, a count fails where it is used as one (a tensor's
        size, a slice) and a step count fails the schema of the checkpoint that records it.

    Raises:
        `ValueError`: Naming the option, what it should be and the value passed.
    """
    argument = argument or name
    choices = _FIELDS[name].metadata.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"`{argument}` should be one of {choices}, but the value passed is {value!r}.")
    domain = DOMAINS.get(name)
    if domain is not None and value not in domain:
        raise ValueError(f"`{argument}` should be {domain.text}, but the value passed is {value!r}.")
    if domain is not None and domain.integer and isinstance(value, float):
        return int(value)
    return value


_FIELDS = {option.name: option for option in fields(FWLoraArguments)}
