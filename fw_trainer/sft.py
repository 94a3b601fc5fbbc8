"""`FWLoraSFTTrainer`: FW-LoRA's hooks ([`FWLoraTrainerMixin`]) applied to trl's `SFTTrainer`
(`pip install "fw-lora[trl]"`)."""

from .extras import require_extra
from .trainer_mixin import FWLoraTrainerMixin


require_extra("FWLoraSFTTrainer", "trl", ["trl"])

from trl import SFTTrainer  # noqa: E402  (after the check that names the extra)


class FWLoraSFTTrainer(FWLoraTrainerMixin, SFTTrainer):
    r"""
    trl's [`~trl.SFTTrainer`] with Fisher-weighted LoRA: supervised fine-tuning (packing, completion-only loss, chat
    templates, `peft_config`, everything `SFTTrainer` does) with the FW-LoRA warm-up and penalty. Everything it changes
    w.r.t. `SFTTrainer` is listed in [`FWLoraTrainerMixin`]; the loss is `SFTTrainer`'s own, normalised over the label
    tokens of the whole accumulated batch.

    Args:
        fw_args ([`FWLoraArguments`], *optional*): The method's arguments; defaults to `FWLoraArguments()`.
        run_data (`dict`, *optional*): What defines the training data, recorded in the run's identity.
        model, args, *trainer_args, **kwargs: Passed to [`~trl.SFTTrainer`] (a model name or a model, `SFTConfig`,
            the datasets, `peft_config`, ...). With `peft_config`, `SFTTrainer` wraps the model and the checks of
            [`FWLoraTrainerMixin`] run on the wrapped model.
    """
