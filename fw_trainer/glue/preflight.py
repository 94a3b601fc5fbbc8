"""
The checks a training run passes before anything is written: `TrainingArguments` values that torch and transformers
would reject only once training starts (or silently misuse), and a dry build of what `Trainer.train()` builds first.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any

from transformers import Trainer, TrainingArguments
from transformers.utils import is_liger_kernel_available

from ..arguments import FWLoraArguments
from ..errors import UsageError


# (argument, what it should be, test).
TRAINING_ARGUMENT_RULES = (
    ("learning_rate", "a finite number >= 0", lambda value: math.isfinite(value) and value >= 0),
    ("weight_decay", "a finite number >= 0", lambda value: math.isfinite(value) and value >= 0),
    ("adam_beta1", "in [0, 1)", lambda value: 0 <= value < 1),
    ("adam_beta2", "in [0, 1)", lambda value: 0 <= value < 1),
    ("adam_epsilon", "a finite number >= 0", lambda value: math.isfinite(value) and value >= 0),
    ("label_smoothing_factor", "in [0, 1]", lambda value: 0 <= value <= 1),
    ("max_grad_norm", "a number >= 0 (0 turns clipping off)", lambda value: value is None or value >= 0),
    ("per_device_train_batch_size", "a positive integer", lambda value: value >= 1),
    ("per_device_eval_batch_size", "a positive integer", lambda value: value >= 1),
    ("gradient_accumulation_steps", "a positive integer", lambda value: value >= 1),
    ("eval_accumulation_steps", "a positive integer (or left out)", lambda value: value is None or value >= 1),
    ("dataloader_num_workers", "an integer >= 0", lambda value: value >= 0),
    ("seed", "an integer in [0, 2**32)", lambda value: 0 <= value < 2**32),
    ("data_seed", "an integer in [0, 2**32) (or left out)", lambda value: value is None or 0 <= value < 2**32),
)


def check_finite(*argument_groups: Any) -> None:
    """
    Refuses NaN and infinity in every numeric field of the given argument dataclasses: no option of ours or of
    transformers has a meaning for them, and a NaN passes every comparison-based check (`lr < 0` is false for NaN).

    Raises:
        `UsageError`: Naming the first such argument.
    """
    for group in argument_groups:
        for option in fields(group):
            value = getattr(group, option.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{option.name} should be a finite number, but the value passed is {value}.")


def check_training_arguments(training_args: TrainingArguments) -> None:
    """
    Checks the [`TRAINING_ARGUMENT_RULES`] (after [`check_finite`]), that a training run trains something, that
    `--fp16` has a GPU, and that every `--report_to` integration is known and installed.

    Raises:
        `UsageError`: Naming the argument, what it should be and the value passed.
    """
    check_finite(training_args)
    for name, requirement, test in TRAINING_ARGUMENT_RULES:
        value = getattr(training_args, name)
        if not test(value):
            raise UsageError(f"--{name} should be {requirement}, but the value passed is {value}.")
    if training_args.do_train and training_args.max_steps <= 0 and not training_args.num_train_epochs > 0:
        raise UsageError(
            f"--num_train_epochs {training_args.num_train_epochs} without --max_steps trains nothing: pass a positive "
            "--num_train_epochs or --max_steps."
        )
    _check_report_to(training_args.report_to)
    if training_args.use_liger_kernel and not is_liger_kernel_available():
        raise UsageError(
            "--use_liger_kernel needs the liger-kernel package, which is not installed (transformers would fail "
            "inside train(), after files were written): `pip install liger-kernel`, or leave out --use_liger_kernel."
        )
    if training_args.fp16 and training_args.device.type == "cpu":
        raise UsageError(
            "--fp16 needs a GPU: on the CPU accelerate would silently train in fp32. Use --bf16 for mixed precision "
            "on the CPU, or drop --fp16."
        )


def _check_report_to(report_to: Any) -> None:
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("all", "none"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise UsageError(
                f"--report_to {name} is not an integration transformers knows: use one of "
                f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}, all or none."
            )
        if name not in get_available_reporting_integrations():
            raise UsageError(
                f"--report_to {name} needs the {name} package, which is not installed: `pip install {name}`, or "
                "report to another integration (tensorboard is installed with fw-lora)."
            )


def check_method_arguments(fw_args: FWLoraArguments) -> None:
    """
    Refuses method arguments that are legal but pointless for a run.

    Raises:
        `UsageError`: `--fw_warmup_steps 0` for a method that measures importances (it would measure nothing).
    """
    if fw_args.uses_fisher_weights and fw_args.fw_warmup_steps == 0:
        raise UsageError(
            f"--fw_warmup_steps 0 measures nothing: every importance of {fw_args.method} would fall back to uniform, "
            "so the penalty would be a plain uniform L2 penalty on the adapters' updates. Pass a positive "
            "--fw_warmup_steps (the default is 500, 200 for iw_lora); for a uniform penalty on purpose, keep the "
            "warm-up and pass --fw_power 0 (every weight 1)."
        )


def check_training_setup(trainer: Trainer) -> None:
    """
    Builds what `train()` builds before its first step (the training dataloader, the optimizer, the learning-rate
    scheduler) and drops them again, so that an argument that torch, transformers or peft reject there (a keyword the
    scheduler does not take, `--optim_args` the optimizer cannot parse, ...) is a usage error before anything is
    written, rather than a traceback once training has begun. This is where their `ValueError`s and `TypeError`s
    become usage errors, and the only place: an error during training itself keeps its traceback.

    Raises:
        `UsageError`: Naming the component, the arguments that configure it and the library's message; or training
            data that gives no batch.
    """
    trainer.check_training_data()
    try:
        with _rejected_arguments("the training dataloader", "--per_device_train_batch_size, --dataloader_*"):
            max_steps = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
        with _rejected_arguments("the optimizer", "--optim, --optim_args, --learning_rate, --weight_decay, --adam_*"):
            trainer.create_optimizer()
        with _rejected_arguments("the learning-rate scheduler", "--lr_scheduler_type, --lr_scheduler_kwargs"):
            trainer.create_scheduler(num_training_steps=max_steps)
    finally:
        # `train()` builds its own, for the model and number of steps it trains.
        trainer.optimizer = trainer.lr_scheduler = None


@contextmanager
def _rejected_arguments(component: str, arguments: str) -> Iterator[None]:
    """A `ValueError` or `TypeError` raised while building `component` as a usage error that names its `arguments`."""
    try:
        yield
    except (ValueError, TypeError) as error:
        raise UsageError(
            f"Training cannot start: {component} rejects the arguments ({type(error).__name__}: {error}). Check "
            f"{arguments}."
        ) from error
