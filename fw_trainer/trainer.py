"""`FWLoraTrainer`: FW-LoRA's hooks ([`FWLoraTrainerMixin`]) applied to `transformers.Trainer`, and to any other
Trainer class through [`fw_lora_trainer_class`]."""

from transformers import Trainer

from .trainer_mixin import FWLoraTrainerMixin


class FWLoraTrainer(FWLoraTrainerMixin, Trainer):
    r"""
    [`~transformers.Trainer`] for Fisher-weighted LoRA: runs `lora`, `adalora`, `fw_lora`, `iw_lora` and `full` through
    one code path, so that timings and results compare like for like. Everything it changes w.r.t. `Trainer` is
    listed in [`FWLoraTrainerMixin`].

    Args:
        fw_args ([`FWLoraArguments`], *optional*): The method's arguments; defaults to `FWLoraArguments()`.
        run_data (`dict`, *optional*):
            What defines the training data (task, sequence length, which examples), recorded in the run's identity and
            compared on resume; defaults to the task in the model's config (`finetuning_task`).
        model, args, *trainer_args, **kwargs: Passed to [`~transformers.Trainer`]. With a LoRA method and
            `ddp_find_unused_parameters` unset, it is set to `False`: every trainable parameter is used each step.
    """


def fw_lora_trainer_class(trainer_class: type[Trainer]) -> type[Trainer]:
    """
    The FW-LoRA version of a Trainer class: `(FWLoraTrainerMixin, trainer_class)`, whose constructor takes the
    arguments of `trainer_class` plus `fw_args` and `run_data` (see [`FWLoraTrainer`]).

    ```python
    from transformers import Seq2SeqTrainer

    FWLoraSeq2SeqTrainer = fw_lora_trainer_class(Seq2SeqTrainer)
    trainer = FWLoraSeq2SeqTrainer(model=model, args=args, train_dataset=data, fw_args=FWLoraArguments())
    ```

    Args:
        trainer_class (`type[Trainer]`): `transformers.Trainer` or a subclass (`Seq2SeqTrainer`, trl's `SFTTrainer`).
    """
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"Expected a subclass of transformers.Trainer, got {trainer_class!r}.")
    if issubclass(trainer_class, FWLoraTrainerMixin):
        return trainer_class
    return type(f"FWLora{trainer_class.__name__}", (FWLoraTrainerMixin, trainer_class), {})
