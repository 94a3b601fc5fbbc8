"""
The checkpoint to resume from: found ([`last_complete_checkpoint`], which passes over a checkpoint whose save was
interrupted) and checked before anything is loaded or written ([`check_checkpoint`]). What a run does with the
checkpoints of its output directory is `run_directory`'s.
"""

import json
import logging
import os
import re
from typing import Any, Optional

from peft import AdaLoraConfig, PeftModel, get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers.trainer import TRAINER_STATE_NAME
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from .adapted_matrices import adapter_directory
from .errors import CheckpointError
from .identity import check_run_identity


logger = logging.getLogger(__name__)

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_RNG_STATE = re.compile(r"^rng_state(_\d+)?\.pth$")
_MODEL_WEIGHTS = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


def is_complete_checkpoint(path: str) -> bool:
    """Whether `path` is a checkpoint a run resumes from exactly: its save finished (the Trainer writes
    `trainer_state.json` last, so one whose `trainer_state.json` is missing or not valid JSON was interrupted) and it
    holds the training state besides the weights ([`missing_training_state`]: not a `--save_only_model` one)."""
    return _read_trainer_state(path) is not None and not missing_training_state(path)


def missing_training_state(path: str) -> list[str]:
    """What of the training state a checkpoint lacks, by what resuming would lose: the optimizer's state (AdamW's
    moments), the learning-rate scheduler's, and the random number generators' (the data order, dropout). A
    checkpoint saved with `--save_only_model` lacks all three."""
    names = os.listdir(path) if os.path.isdir(path) else []
    present = {
        "the optimizer state (optimizer.pt)": any(name.startswith("optimizer") for name in names),
        "the learning-rate scheduler (scheduler.pt)": "scheduler.pt" in names,
        "the random number generators (rng_state*.pth)": any(_RNG_STATE.match(name) for name in names),
    }
    return [what for what, found in present.items() if not found]


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """
    The checkpoint with the highest step in `output_dir` whose save finished (see [`is_complete_checkpoint`]), or
    `None`. Unlike transformers' `get_last_checkpoint`, it passes over a checkpoint left incomplete by a run killed
    while saving it (with a warning), so that the run resumes from the one before.
    """
    for checkpoint in _checkpoints_last_first(output_dir):
        if is_complete_checkpoint(checkpoint):
            return checkpoint
        if _read_trainer_state(checkpoint) is None:
            reason = f"its save was interrupted (no valid {TRAINER_STATE_NAME})"
        else:
            missing = ", ".join(missing_training_state(checkpoint))
            reason = f"it holds the weights without {missing} (--save_only_model)"
        logger.warning("Passing over %s: %s.", checkpoint, reason)
    return None


def last_weights_only_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint with the highest step in `output_dir` whose save finished but which holds the weights without
    the training state (`--save_only_model`): what `--resume_weights_only` can warm-start from; or `None`."""
    for checkpoint in _checkpoints_last_first(output_dir):
        if _read_trainer_state(checkpoint) is not None and missing_training_state(checkpoint):
            return checkpoint
    return None


def _checkpoints_last_first(output_dir: str) -> list[str]:
    """The `checkpoint-<step>` folders of `output_dir`, highest step first."""
    if not os.path.isdir(output_dir):
        return []
    steps = {}
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps[int(match.group(1))] = os.path.join(output_dir, name)
    return [steps[step] for step in sorted(steps, reverse=True)]


def check_checkpoint(
    checkpoint_dir: str, model: nn.Module, identity: dict[str, Any], weights_only: bool = False
) -> None:
    """
    Checks that a run can resume from `checkpoint_dir`, reading only small files (no weights are loaded): it exists
    and is a complete checkpoint, its run identity matches the run asked for (see [`check_run_identity`]), and it
    holds weights that fit `model` (the adapter's tensors, by name and shape, for a LoRA model).

    Args:
        checkpoint_dir (`str`): The checkpoint to resume from.
        model (`nn.Module`): The model being trained (a peft model, or the plain model of full fine-tuning).
        identity (`dict`): The [`run_identity`] of the run asked for.
        weights_only (`bool`, *optional*, defaults to `False`):
            Accept a checkpoint without the training state ([`missing_training_state`]: `--save_only_model`), which
            then resumes as a warm start: from its step to the end of the run, with its weights and Fisher warm-up
            state but a new optimizer, a learning-rate schedule restarted from its first step and a new random state;
            refused otherwise.

    Raises:
        `CheckpointError`: Saying what is wrong with the checkpoint and what to do; a [`RunMismatchError`] when it is
            another run.
    """
    where = "(a folder `checkpoint-<step>` in the output directory of the run)"
    if not os.path.exists(checkpoint_dir):
        parent = os.path.dirname(os.path.normpath(checkpoint_dir))
        last = last_complete_checkpoint(parent) if parent else None
        hint = f" The last complete checkpoint in {parent} is {last}." if last else ""
        raise CheckpointError(f"The checkpoint {checkpoint_dir} does not exist.{hint} Pass an existing one {where}.")
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir} is a file, not a checkpoint: pass a checkpoint directory {where}.")
    if _read_trainer_state(checkpoint_dir) is not None and missing_training_state(checkpoint_dir) and not weights_only:
        raise CheckpointError(
            f"The checkpoint {checkpoint_dir} holds the weights but not "
            + ", ".join(missing_training_state(checkpoint_dir))
            + " (saved with --save_only_model): resuming it would not continue the run but restart AdamW's moments "
            "and the learning-rate schedule from its beginning. Resume from a checkpoint saved without "
            "--save_only_model, or pass --resume_weights_only to start again from these weights on purpose."
        )
    if _read_trainer_state(checkpoint_dir) is None:
        last = last_complete_checkpoint(checkpoint_dir)
        if last is not None:
            raise CheckpointError(
                f"{checkpoint_dir} is the output directory of a run, not a checkpoint: pass one of its checkpoints, "
                f"e.g. the last complete one, {last}."
            )
        named_as_one = _CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(checkpoint_dir)))
        if named_as_one or os.path.exists(os.path.join(checkpoint_dir, TRAINER_STATE_NAME)):
            raise CheckpointError(
                f"The checkpoint {checkpoint_dir} is incomplete: its {TRAINER_STATE_NAME} is missing or damaged, so "
                "its save was interrupted. Resume from an earlier checkpoint."
            )
        raise CheckpointError(
            f"{checkpoint_dir} is not a checkpoint: it has no {TRAINER_STATE_NAME}. Pass a checkpoint {where}."
        )
    check_run_identity(checkpoint_dir, identity)
    _check_weights(checkpoint_dir, model)


def _check_weights(checkpoint_dir: str, model: nn.Module) -> None:
    """The checkpoint holds weights of the kind `model` loads; a LoRA adapter's tensors have the model's names and
    shapes (AdaLoRA's are compared by name only: its saved ranks shrink with the allocation)."""
    if not isinstance(model, PeftModel):
        if not any(os.path.isfile(os.path.join(checkpoint_dir, name)) for name in _MODEL_WEIGHTS):
            raise CheckpointError(
                f"The checkpoint {checkpoint_dir} holds no model weights ({SAFE_WEIGHTS_NAME}): it is not a "
                "checkpoint of full fine-tuning. Resume with the method it was trained with."
            )
        return
    # peft saves an adapter not named "default" in a subfolder of that name.
    adapter_dir = adapter_directory(checkpoint_dir, model.active_adapter)
    safetensors_file = os.path.join(adapter_dir, ADAPTER_SAFE_WEIGHTS_NAME)
    if not os.path.isfile(safetensors_file):
        if not os.path.isfile(os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)):
            raise CheckpointError(
                f"The checkpoint {checkpoint_dir} holds no adapter weights ({ADAPTER_SAFE_WEIGHTS_NAME}): it is not a "
                "checkpoint of a LoRA method. Resume with the method it was trained with."
            )
        return  # a pickled adapter: checked by peft when it loads it
    try:
        with safe_open(safetensors_file, framework="pt") as f:
            saved = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except (OSError, SafetensorError) as error:
        raise CheckpointError(
            f"{safetensors_file} is damaged ({error}). Resume from an earlier checkpoint."
        ) from error
    by_shape = not isinstance(model.peft_config[model.active_adapter], AdaLoraConfig)
    state = get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    expected = {name: list(tensor.shape) for name, tensor in state.items()}
    differing = sorted(
        name
        for name in saved.keys() | expected.keys()
        if name not in saved or name not in expected or (by_shape and saved[name] != expected[name])
    )
    if differing:
        name = differing[0]
        raise CheckpointError(
            f"The adapter weights in {checkpoint_dir} do not fit the model being trained: {len(differing)} tensor(s) "
            f"differ, e.g. {name} ({_shape(saved, name)} in the checkpoint, {_shape(expected, name)} in the model). "
            "It was trained with other LoRA targets or another rank: resume with those."
        )


def _shape(tensors: dict[str, list[int]], name: str) -> str:
    return f"shape {tensors[name]}" if name in tensors else "absent"


def _read_trainer_state(path: str) -> Optional[dict]:
    state_file = os.path.join(path, TRAINER_STATE_NAME)
    if not os.path.isfile(state_file):  # not a regular file (a device would be read without end)
        return None
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return state if isinstance(state, dict) else None
