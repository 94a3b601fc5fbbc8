"""What the trainer refuses before anything trains, each with one paragraph that says what to do: a model or an
engine on which the method would not be what it says ([`refuse_untrainable_model`]), and training data that gives
no batch ([`refuse_empty_training_data`])."""

from typing import Optional

from torch import nn
from torch.utils.data import Dataset
from transformers.trainer_utils import has_length

from .adapted_matrices import active_lora_adapter, find_adapted_matrices
from .arguments import FWLoraArguments
from .errors import UsageError


def refuse_untrainable_model(model: nn.Module, fw_args: FWLoraArguments, fsdp: bool, deepspeed: bool) -> None:
    """
    A LoRA method needs one active LoRA adapter; FW-LoRA and IW-LoRA also need one that they measure and penalise
    exactly ([`find_adapted_matrices`]), with more matrices than `fw_exempt_top` exempts, and an engine that leaves
    the gradients in `.grad` (not FSDP or DeepSpeed through the Trainer).

    Raises:
        `UsageError`: Saying what is wrong and what to do.
    """
    if fw_args.uses_fisher_weights:
        num_matrices = len(find_adapted_matrices(model))
        if fw_args.fw_exempt_top >= num_matrices:
            raise UsageError(
                f"--fw_exempt_top {fw_args.fw_exempt_top} would leave every one of the model's {num_matrices} adapted "
                "matrices unpenalised: the run would be plain LoRA, not a control. Exempt fewer matrices than "
                f"that (at most {num_matrices - 1}), or train with --method lora."
            )
        if fsdp or deepspeed:
            engine = "FSDP" if fsdp else "DeepSpeed"
            raise UsageError(
                f"FW-LoRA and IW-LoRA are not tested under {engine} through the Trainer, which adds the penalty's "
                "gradient into `.grad` (sharded there): they are refused rather than assumed to work. Train with "
                "DDP (`accelerate launch` with a plain multi-GPU config), run `lora` as a baseline under this "
                "engine, or, for FSDP2, drive `FisherEstimator` and `FisherWeightedPenalty` from your own loop "
                "with the penalty in the loss (tested under `fully_shard`: tests/test_fsdp.py)."
            )
    elif fw_args.uses_lora:
        active_lora_adapter(model)


def refuse_empty_training_data(
    dataset: Optional[Dataset], per_device_batch_size: int, world_size: int, drop_last: bool
) -> None:
    """
    Training data that gives no batch (no rows, or fewer rows than one batch of all processes with
    `dataloader_drop_last`) would end a run without one optimizer step that still looks finished.

    Raises:
        `UsageError`: Saying how many rows and what batch, and what to change.
    """
    if dataset is None or not has_length(dataset):
        return  # an iterable dataset: its length is not known before it is read
    rows, batch = len(dataset), per_device_batch_size * world_size
    if rows // batch if drop_last else rows:
        return
    dropped = " with --dataloader_drop_last, which drops the last incomplete batch" * (rows > 0)
    raise UsageError(
        f"The training data gives no batch, so nothing would train: {rows} rows, batches of {batch} "
        f"({per_device_batch_size} per process × {world_size} processes){dropped}. Lower "
        "--per_device_train_batch_size, train on more rows, or leave out --dataloader_drop_last."
    )
