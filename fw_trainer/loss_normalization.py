"""
Whether a transformers model's own loss is normalised by `num_items_in_batch` (the label tokens of the whole
accumulated batch), which decides how `Trainer` scales it under gradient accumulation.
"""

import inspect

from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING


def loss_uses_num_items_in_batch(model: nn.Module) -> bool:
    """
    Whether `model(**inputs, num_items_in_batch=n)` returns a loss divided by `n`.

    `Trainer` passes `num_items_in_batch` to every model whose `forward` takes `**kwargs`, and then leaves the
    gradient-accumulation division to the model. That is right for the models whose forward hands its keyword
    arguments to `self.loss_function` (transformers' causal and masked LMs: a sum over the label tokens of the whole
    accumulated batch, divided by their number), and wrong for those that ignore it
    (`RobertaForSequenceClassification`, `LlamaForSequenceClassification`, ...: a per-micro-batch mean, so the gradient
    comes out `accumulation steps` times too large). This tells the two apart from the model class: its explicit
    `accepts_loss_kwargs` if it sets one, else whether its `forward` calls `self.loss_function` and that loss (by
    `loss_type`) takes `num_items_in_batch`.

    Args:
        model (`nn.Module`): The task model, unwrapped (not the peft, DDP or compiled wrapper).
    """
    explicit = getattr(model, "accepts_loss_kwargs", None)  # as the Trainer reads it
    if isinstance(explicit, bool):
        return explicit
    try:
        source = inspect.getsource(inspect.unwrap(type(model).forward))
    except (OSError, TypeError):  # no source (a compiled or dynamically built class): believe the signature
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
    if "self.loss_function" not in source:
        return False
    # `PreTrainedModel.loss_function` falls back to the causal LM loss for an unknown `loss_type`.
    loss_function = LOSS_MAPPING.get(getattr(model, "loss_type", None), LOSS_MAPPING["ForCausalLM"])
    return "num_items_in_batch" in inspect.signature(loss_function).parameters
