"""Fisher-Weighted LoRA (FW-LoRA) for Hugging Face `Trainer` and `peft`."""

from .adalora_callback import AdaLoraAllocationCallback
from .adapted_matrices import AdaptedMatrix, find_adapted_matrices
from .arguments import FWLoraArguments
from .checkpoints import check_checkpoint, last_complete_checkpoint
from .errors import CheckpointError, RunMismatchError, WarmupDivergedError
from .fisher_estimator import FisherEstimator
from .fisher_warmup import FisherWarmupCallback
from .identity import run_identity
from .importance import bias_corrected, ema_update, normalize_importances
from .measurement import compile_stats, reset_compile_stats
from .model_builder import AdapterSummary, build_peft_model, rank_for_budget, resolve_target_modules
from .penalty import FisherWeightedPenalty
from .trainer import FWLoraTrainer, fw_lora_trainer_class
from .trainer_mixin import FWLoraTrainerMixin
from .version import __version__ as __version__  # re-exported


__all__ = [
    "AdaLoraAllocationCallback",
    "AdaptedMatrix",
    "AdapterSummary",
    "CheckpointError",
    "FWLoraArguments",
    "FWLoraTrainer",
    "FWLoraTrainerMixin",
    "FisherEstimator",
    "FisherWarmupCallback",
    "FisherWeightedPenalty",
    "RunMismatchError",
    "WarmupDivergedError",
    "bias_corrected",
    "build_peft_model",
    "check_checkpoint",
    "compile_stats",
    "ema_update",
    "find_adapted_matrices",
    "fw_lora_trainer_class",
    "last_complete_checkpoint",
    "normalize_importances",
    "rank_for_budget",
    "reset_compile_stats",
    "resolve_target_modules",
    "run_identity",
]
