"""
Forgetting, as LLM fine-tuning benchmarks measure it (peft's `method_comparison`): the language-modelling loss of a
causal LM on a held-out text sample the user names, before and after training ([`language_modelling_loss`],
[`read_held_out_texts`], [`forgetting_record`]). A fine-tuning that forgets less leaves that loss closer to where it
started. The measure needs a causal LM: it does not apply to the GLUE script's classifiers.
"""

import json
import os
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .errors import UsageError


# The label of a position that does not count, as transformers' losses ignore it.
IGNORE_INDEX = -100
# The causal LM classes transformers knows, by name (`LlamaForCausalLM`, `GPT2LMHeadModel`, ...).
_CAUSAL_LM_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def read_held_out_texts(path: str) -> list[str]:
    """
    Reads the held-out text sample of a forgetting measure: a `.jsonl` file with a `"text"` field per line, or any
    other file as one text per line. Blank lines are skipped.

    Args:
        path (`str`): The file the user named.

    Returns:
        `list[str]`: The texts, in file order.

    Raises:
        `UsageError`: If the file is missing, holds no text, or a `.jsonl` line is not a JSON object with a `"text"`
            string.
    """
    if not os.path.isfile(path):
        raise UsageError(
            f"The held-out text file {path} does not exist. Name a file of one text per line, or a .jsonl file with a "
            '"text" field per line.'
        )
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                texts.append(line.rstrip("\n"))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(
                    f"Line {number} of {path} is not JSON ({error.msg}): each line of a .jsonl file must be an object "
                    'with a "text" field.'
                ) from error
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UsageError(
                    f'Line {number} of {path} has no "text" string: each line of a .jsonl file must be an object with '
                    'a "text" field.'
                )
            texts.append(record["text"])
    if not texts:
        raise UsageError(f"The held-out text file {path} holds no text. Give it at least one non-blank line.")
    return texts


def _check_causal_lm(model: nn.Module) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    # A class transformers does not list (remote code, say) is taken at its name.
    if name not in _CAUSAL_LM_CLASSES and not name.endswith(("ForCausalLM", "LMHeadModel")):
        raise UsageError(
            f"The forgetting measure needs a causal language model, but the model is a {name}: a masked-LM or encoder "
            "model (a classifier, say) does not predict the next token. Measure forgetting on a *ForCausalLM model, "
            "or leave it out for this one."
        )


def _batches(
    token_ids: list[list[int]], batch_size: int, pad_token_id: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded `input_ids`, `attention_mask` and `labels` per batch, on the host. Right padding: a real token
    never sees a pad under the causal mask, and positions count from 0 whatever the tokenizer's padding side."""
    batches = []
    for start in range(0, len(token_ids), batch_size):
        chunk = token_ids[start : start + batch_size]
        length = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        batches.append((input_ids, attention_mask, labels))
    return batches


def language_modelling_loss(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 8,
    max_length: Optional[int] = None,
) -> float:
    """
    The mean next-token cross-entropy of a causal LM over every label token of `texts`: what transformers' causal LM
    loss gives on the whole sample as one batch (a mean over tokens, not a mean of per-batch means). Padding does not
    count. Runs under `torch.no_grad()` in eval mode (each module's mode is restored after), on the device of the
    model's first parameter; the sums stay on the device until one host sync at the end.

    Args:
        model (`nn.Module`): A causal LM (`*ForCausalLM`), plain or peft-wrapped.
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer; special tokens are added as it adds them (e.g. BOS). A
            tokenizer without a pad token is fine: padding is masked out.
        texts (`Sequence[str]`): The held-out sample, e.g. from [`read_held_out_texts`].
        batch_size (`int`, *optional*, defaults to 8): Texts per forward pass.
        max_length (`int`, *optional*): Longer texts are cut to this many tokens; by default they are not cut.

    Returns:
        `float`: The mean loss in nats per token.

    Raises:
        `UsageError`: If the model is not a causal LM (naming its class), or `texts` holds no token to predict (each
            text needs two tokens or more).
    """
    _check_causal_lm(model)
    if batch_size < 1:
        raise ValueError(f"`batch_size` should be at least 1, but the value passed is {batch_size}")
    encoded = tokenizer(list(texts), truncation=max_length is not None, max_length=max_length)["input_ids"]
    # Counted on the host, from the lengths: the first token of each text is no one's label.
    num_labels = sum(max(len(ids) - 1, 0) for ids in encoded)
    if num_labels == 0:
        raise UsageError(
            f"The held-out sample ({len(encoded)} texts) has no token to predict: each text needs two tokens or more."
        )
    encoded = [ids for ids in encoded if ids]
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    device = next(model.parameters()).device
    modes = {module: module.training for module in model.modules()}
    # The KV cache is of no use for one forward pass per batch; models without the option do not get it.
    config = getattr(model, "config", None)
    kwargs = {"use_cache": False} if hasattr(config, "use_cache") else {}
    # Summed in float64 where the device has it (MPS does not), so that a long sample loses no precision.
    total = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    model.eval()
    try:
        with torch.no_grad():
            for input_ids, attention_mask, labels in _batches(encoded, batch_size, pad_token_id):
                input_ids, attention_mask, labels = (
                    t.to(device, non_blocking=True) for t in (input_ids, attention_mask, labels)
                )
                logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
                # As transformers' causal LM loss: position t predicts token t + 1, in float32.
                total += F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(),
                    labels[:, 1:].flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
    finally:
        for module, training in modes.items():
            module.training = training
    return total.item() / num_labels


def forgetting_record(loss_before: float, loss_after: float) -> dict[str, Any]:
    """
    What a run records of its forgetting: the held-out loss before and after training, and `forgetting`, their
    difference (after − before; positive when training made the held-out text less likely).
    """
    return {
        "held_out_loss_before": loss_before,
        "held_out_loss_after": loss_after,
        "forgetting": loss_after - loss_before,
    }
