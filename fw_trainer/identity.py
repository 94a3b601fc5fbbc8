"""
What a run is, recorded in every checkpoint as `fw_run_identity.json` and compared when the run is resumed, so that a
resumed run is the run it claims to be: [`run_identity`], [`write_run_identity`], [`check_run_identity`].
"""

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, Optional

import peft
import torch
import transformers
from torch import nn
from transformers import TrainingArguments

from .arguments import ADDED_OPTIONS, FISHER_WEIGHTED_METHODS, FWLoraArguments
from .errors import ABSENT, CheckpointError, RunMismatchError
from .state_files import OBJECT_SCHEMA, RUN_IDENTITY_FILE, read_state_file, write_json_atomic
from .version import __version__


logger = logging.getLogger(__name__)

# `TrainingArguments` that define the optimisation, and so the run. Every other one may change when a run is resumed:
# the length (`num_train_epochs`, `max_steps`: the learning-rate schedule is recomputed for the new length), logging,
# evaluation and saving (strategy, steps, `save_total_limit`), `per_device_eval_batch_size`, the dataloader's workers,
# the reporting integrations, the output and Hub options.
TRAINING_FIELDS = (
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "optim",
    "optim_args",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "label_smoothing_factor",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "data_seed",
)
# What the user passes for each field of `run` (the data's fields come from the script: `resume_rules`' argument).
RUN_FIELD_ARGUMENTS = {
    "base_model": "--model_name_or_path",
    "model_type": "--model_name_or_path",
    "num_labels": "the number of labels",
    "method": "--method",
    "rank": "the rank (--lora_r, or the rank a --lora_budget gave)",
    "init_rank": "--adalora_init_r_ratio",
    "lora_alpha": "--lora_alpha",
    "lora_dropout": "--lora_dropout",
    "target_modules": "--lora_target_modules (as resolved)",
    "use_dora": "--use_dora",
    "use_rslora": "--use_rslora",
    "init_lora_weights": "--init_lora_weights",
    **{name: f"--{name}" for name in TRAINING_FIELDS},
}
# The method's own arguments, by method: the `FWLoraArguments` fields with these prefixes (rank, alpha, dropout and
# targets are read from the adapter that was built instead: a rank given as a budget is compared as the rank it
# became). `fw_run_identity.json`: the two parts of [`run_identity`].
IDENTITY_SCHEMA = {"run": OBJECT_SCHEMA, "environment": OBJECT_SCHEMA}
_METHOD_FIELD_PREFIXES = {"adalora": "adalora_", **dict.fromkeys(FISHER_WEIGHTED_METHODS, "fw_")}


def run_identity(
    model: nn.Module,
    fw_args: FWLoraArguments,
    args: TrainingArguments,
    data: Optional[dict[str, Any]] = None,
    adapter_name: Optional[str] = None,
) -> dict[str, Any]:
    """
    What a run is, as a JSON-serialisable mapping with two parts.

    `run` must be the same for a checkpoint to be resumed: the base model (`base_model`, its `model_type` and
    `num_labels`), the data (`data`: the task and what selects the training examples), the `method` and the
    arguments of that method only (`fw_*` for FW-LoRA and IW-LoRA, `adalora_*` for AdaLoRA), the adapter as built
    (`rank`, `init_rank` for AdaLoRA, `lora_alpha`, `lora_dropout`, `target_modules` as resolved module names, and
    `use_dora`, `use_rslora`, `init_lora_weights` where a LoRA variant was chosen) and the
    optimisation ([`TRAINING_FIELDS`]).

    `environment` may differ, with a warning: the library versions (torch, transformers, peft, fw-lora), the number
    of processes and the precision. A resume with a patch release of torch, on another number of GPUs or in fp32
    instead of bf16 continues the same run, only not bit for bit; refusing it would strand a long run after an
    upgrade, so these are reported rather than refused.

    Args:
        model (`nn.Module`): The model being trained (a peft model, or the plain model of full fine-tuning).
        fw_args ([`FWLoraArguments`]): The method's arguments.
        args (`TrainingArguments`): The training arguments.
        data (`dict`, *optional*):
            What defines the training data, e.g. `{"task": "sst2", "max_seq_length": 128, ...}`; defaults to the
            task recorded in the model's config (`finetuning_task`).
        adapter_name (`str`, *optional*): The peft adapter being trained; defaults to the model's active adapter.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    run = {
        "base_model": config.name_or_path,
        "model_type": config.model_type,
        "num_labels": config.num_labels,
        "data": data if data is not None else {"task": getattr(config, "finetuning_task", None)},
        "method": fw_args.method,
    }
    prefix = _METHOD_FIELD_PREFIXES.get(fw_args.method)
    for field in fields(fw_args):
        unused = field.name == "fw_sketch_probes" and fw_args.fw_estimator == "exact"
        if prefix is not None and field.name.startswith(prefix) and not unused:
            run[field.name] = getattr(fw_args, field.name)
    if adapter_name is None:
        adapter_name = getattr(model, "active_adapter", None)
    peft_config = getattr(model, "peft_config", {}).get(adapter_name) if isinstance(adapter_name, str) else None
    if peft_config is not None:
        adalora = isinstance(peft_config, peft.AdaLoraConfig)
        run["rank"] = peft_config.target_r if adalora else peft_config.r
        if adalora:
            run["init_rank"] = peft_config.init_r
        run["lora_alpha"] = peft_config.lora_alpha
        run["lora_dropout"] = peft_config.lora_dropout
        run["target_modules"] = sorted(peft_config.target_modules)
        # LoRA variants, where chosen: a plain run's identity stays what it was before they could be.
        for option, plain in (("use_dora", False), ("use_rslora", False), ("init_lora_weights", True)):
            if getattr(peft_config, option, plain) != plain:
                run[option] = getattr(peft_config, option)
    run.update({name: getattr(args, name) for name in TRAINING_FIELDS})
    environment = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "fw-lora": __version__,
        "world_size": args.world_size,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
    }
    # Through JSON and back, so that it compares equal to a saved one (tuples become lists, enums strings).
    return json.loads(json.dumps({"run": run, "environment": environment}))


def write_run_identity(output_dir: str, identity: dict[str, Any]) -> None:
    """Writes [`run_identity`] to `output_dir/fw_run_identity.json`, atomically."""
    write_json_atomic(os.path.join(output_dir, RUN_IDENTITY_FILE), identity)


def read_run_identity(checkpoint_dir: str) -> dict[str, Any]:
    """
    The identity saved in a checkpoint ([`write_run_identity`]: every checkpoint of an fw-lora run has one).

    Raises:
        `CheckpointError`: If the checkpoint has none (not written by fw-lora's trainer, or its save was interrupted)
            or the file is damaged.
    """
    path = os.path.join(checkpoint_dir, RUN_IDENTITY_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"The checkpoint {checkpoint_dir} has no {RUN_IDENTITY_FILE}, which every checkpoint of an fw-lora run "
            "holds: it was not written by FWLoraTrainer, or its save was interrupted. Resume from a checkpoint of "
            "this run, or start the run again."
        )
    return read_state_file(path, IDENTITY_SCHEMA)


def check_run_identity(checkpoint_dir: str, identity: dict[str, Any]) -> None:
    """
    Compares the identity saved in a checkpoint with the run asked for ([`run_identity`]). A difference in `run`
    refuses the resume; a difference in `environment` is logged as a warning. An option the checkpoint's version of
    fw-lora did not have ([`ADDED_OPTIONS`]) is compared as the value that does what that version did.

    Raises:
        `RunMismatchError`: Naming each field of `run` that differs, with both values.
        `CheckpointError`: If the checkpoint has no identity, or a damaged one.
    """
    saved = read_run_identity(checkpoint_dir)
    # A checkpoint written before an option existed ran with the value that does what the code did then.
    added = {name: value for name, value in ADDED_OPTIONS.items() if name in identity["run"]}
    differences = _differences({**added, **saved["run"]}, identity["run"])
    if differences:
        raise RunMismatchError(checkpoint_dir, differences)
    changed = _differences(saved["environment"], identity["environment"])
    if changed:
        logger.warning(
            "Resuming %s in another environment: %s. The run continues as asked, but may not reproduce an "
            "uninterrupted run bit for bit.",
            checkpoint_dir,
            "; ".join(f"{name} {old} then, {new} now" for name, old, new in changed),
        )


def _differences(saved: dict[str, Any], asked: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Each key whose value differs, in the order of `asked` then the keys only `saved` has; nested mappings (the
    data) are compared key by key, as `data.task`, ..."""
    differences = []
    for name in [*asked, *(key for key in saved if key not in asked)]:
        old, new = saved.get(name, ABSENT), asked.get(name, ABSENT)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += [(f"{name}.{key}", *values) for key, *values in _differences(old, new)]
        elif old != new:
            differences.append((name, old, new))
    return differences


def resume_rules(data_arguments: Sequence[str]) -> str:
    """
    What a resume must keep and what it may change, in words, from the fields of [`run_identity`] (`--help` and
    docs/run_outputs.md say this).

    Args:
        data_arguments (`Sequence[str]`): The arguments that select the training data (what the script records as
            `data`).
    """
    prefixes = sorted(set(_METHOD_FIELD_PREFIXES.values()))
    method = "--method and its own arguments (" + ", ".join(f"--{prefix}*" for prefix in prefixes) + ")"
    must = dict.fromkeys([*data_arguments, method, *RUN_FIELD_ARGUMENTS.values()])
    must.pop("--method")
    return (
        "Resuming (--resume_from_checkpoint, or an output directory holding an interrupted run): the checkpoint must "
        "be of the same run, or the resume is refused, naming each differing field. The same run means the same "
        + ", ".join(must)
        + ". Everything else may change on resume: --num_train_epochs and --max_steps (the schedule is recomputed for "
        "the new length), logging, evaluation and saving options, --per_device_eval_batch_size, --max_eval_samples, "
        "dataloader and reporting options. Other library versions, another number of processes or another precision "
        "are reported as a warning."
    )
