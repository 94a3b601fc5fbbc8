"""
What FW-LoRA knows of each encoder architecture: which linear layer of an encoder layer plays which role (query, key,
value, attention output, FFN in, FFN out), and how to read a module's layer and role from its name. The model builder
(default LoRA targets) and the figures (layer × role heatmaps) both read these tables, and nothing else keeps a copy.
"""

import re
from typing import Optional


# The six roles of a transformer encoder layer that LoRA/AdaLoRA adapt, in the order of the forward pass.
TARGET_ROLES = ("query", "key", "value", "attention_output", "ffn_in", "ffn_out")

_BERT_STYLE_ROLES = {
    "query": r"attention\.self\.query",
    "key": r"attention\.self\.key",
    "value": r"attention\.self\.value",
    "attention_output": r"attention\.output\.dense",
    "ffn_in": r"intermediate\.dense",
    # FFN out is `layer.N.output.dense`; the look-behind keeps `attention.output.dense` (also ending so) out.
    "ffn_out": r"(?<!attention\.)output\.dense",
}
# DeBERTa-v2/v3: BERT's layout with `*_proj` attention projections. The relative-position projections
# (`attention.self.pos_key_proj`/`pos_query_proj`, when `share_att_key` is off) and the ContextPooler (`pooler.dense`,
# head) do not match. DeBERTa v1 (model_type "deberta") fuses q, k, v into one `in_proj`: no default for it.
_DEBERTA_V2_ROLES = {
    **_BERT_STYLE_ROLES,
    "query": r"attention\.self\.query_proj",
    "key": r"attention\.self\.key_proj",
    "value": r"attention\.self\.value_proj",
}
_DISTILBERT_ROLES = {
    "query": r"attention\.q_lin",
    "key": r"attention\.k_lin",
    "value": r"attention\.v_lin",
    "attention_output": r"attention\.out_lin",
    "ffn_in": r"ffn\.lin1",
    "ffn_out": r"ffn\.lin2",
}
# Per `config.model_type`: role → regex that the module name must end with (at a `.` boundary). Every table has the
# six `TARGET_ROLES`, the setup of AdaLoRA's GLUE experiments.
ENCODER_TARGET_ROLES = {
    **{
        model_type: _BERT_STYLE_ROLES
        for model_type in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "data2vec-text", "ernie")
    },
    "deberta-v2": _DEBERTA_V2_ROLES,
    "distilbert": _DISTILBERT_ROLES,
}

_LAYER_INDEX = re.compile(r"\.layer\.(\d+)\.")
_LAYER_PART = re.compile(r"\.layer\.\d+\.")


def role_pattern(suffix: str) -> re.Pattern:
    # Anchored at a name boundary, so that e.g. `crossattention.self.query` is not a `query`.
    return re.compile(r"(?:^|\.)(?:" + suffix + r")$")


def target_role(model_type: str, module_name: str) -> Optional[str]:
    """
    The role that a module plays in its encoder layer, by the default-target table of its architecture.

    Args:
        model_type (`str`): The model's `config.model_type`, e.g. `"deberta-v2"`.
        module_name (`str`):
            A module name as in the base model (`deberta.encoder.layer.3.attention.self.query_proj`); peft's
            `base_model.model.` prefix does not matter.

    Returns:
        `Optional[str]`: One of `TARGET_ROLES` (`"query"`, `"key"`, `"value"`, `"attention_output"`, `"ffn_in"`,
        `"ffn_out"`), or `None` if the name plays none of them or `model_type` has no default targets.
    """
    roles = ENCODER_TARGET_ROLES.get(model_type)
    if roles is None:
        return None
    for role, suffix in roles.items():
        if role_pattern(suffix).search(module_name):
            return role
    return None


def module_role(module_name: str) -> Optional[str]:
    """
    The role of a module in its encoder layer for any architecture of `ENCODER_TARGET_ROLES` (the tables' suffixes do
    not overlap), else the part of the name after `.layer.<i>.` (a custom target), or `None` outside the layers.
    """
    for roles in ENCODER_TARGET_ROLES.values():
        for role, suffix in roles.items():
            if role_pattern(suffix).search(module_name):
                return role
    match = _LAYER_PART.search(module_name)
    return module_name[match.end() :] if match else None


def layer_index(module_name: str) -> Optional[int]:
    """
    The encoder layer a module belongs to (`roberta.encoder.layer.3.attention...` and DistilBERT's
    `distilbert.transformer.layer.3.ffn.lin1` → 3), or `None`.
    """
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None
