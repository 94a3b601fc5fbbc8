"""
What FW-LoRA knows of each transformer architecture, encoder or decoder: which linear layer of a transformer layer
plays which role (query, key, value, attention output, FFN in, FFN out, and a decoder's gate and fused projections),
and how to read a module's layer and role from its name. The model builder (default LoRA targets) and the figures
(layer × role heatmaps) both read these tables, and nothing else keeps a copy.
"""

import re
from typing import Optional


# The roles of a transformer layer's linear layers that LoRA/AdaLoRA adapt, in the order of the forward pass: an
# encoder's six, a decoder's gated FFN (`ffn_gate` beside `ffn_in`, the up projection), and the fused projections
# some architectures have (`qkv`: GPT-2's `c_attn`, GPT-NeoX's `query_key_value`, Phi-3's `qkv_proj`; `ffn_gate_up`:
# Phi-3's `gate_up_proj`).
TARGET_ROLES = (
    "query",
    "key",
    "value",
    "qkv",
    "attention_output",
    "ffn_gate",
    "ffn_in",
    "ffn_gate_up",
    "ffn_out",
)

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
# six encoder roles of `TARGET_ROLES`, the setup of AdaLoRA's GLUE experiments.
ENCODER_TARGET_ROLES = {
    **{
        model_type: _BERT_STYLE_ROLES
        for model_type in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "data2vec-text", "ernie")
    },
    "deberta-v2": _DEBERTA_V2_ROLES,
    "distilbert": _DISTILBERT_ROLES,
}

# Llama's layout, shared by most decoder LLMs: `self_attn.{q,k,v,o}_proj` and a gated FFN `mlp.{gate,up,down}_proj`.
_LLAMA_STYLE_ROLES = {
    "query": r"self_attn\.q_proj",
    "key": r"self_attn\.k_proj",
    "value": r"self_attn\.v_proj",
    "attention_output": r"self_attn\.o_proj",
    "ffn_gate": r"mlp\.gate_proj",
    "ffn_in": r"mlp\.up_proj",
    "ffn_out": r"mlp\.down_proj",
}
# Phi-3 fuses q, k, v into `qkv_proj` and gate and up into `gate_up_proj`.
_PHI3_ROLES = {
    "qkv": r"self_attn\.qkv_proj",
    "attention_output": r"self_attn\.o_proj",
    "ffn_gate_up": r"mlp\.gate_up_proj",
    "ffn_out": r"mlp\.down_proj",
}
# GPT-2's layers are `transformers.pytorch_utils.Conv1D` (weight stored `d_in × d_out`); `c_proj` is both the attention
# output (`attn.c_proj`) and the FFN out (`mlp.c_proj`).
_GPT2_ROLES = {
    "qkv": r"attn\.c_attn",
    "attention_output": r"attn\.c_proj",
    "ffn_in": r"mlp\.c_fc",
    "ffn_out": r"mlp\.c_proj",
}
_GPT_NEOX_ROLES = {
    "qkv": r"attention\.query_key_value",
    "attention_output": r"attention\.dense",
    "ffn_in": r"mlp\.dense_h_to_4h",
    "ffn_out": r"mlp\.dense_4h_to_h",
}
_OPT_ROLES = {
    "query": r"self_attn\.q_proj",
    "key": r"self_attn\.k_proj",
    "value": r"self_attn\.v_proj",
    "attention_output": r"self_attn\.out_proj",
    "ffn_in": r"fc1",
    "ffn_out": r"fc2",
}
# Per `config.model_type` of the decoder families transformers ships, with every attention and FFN projection of each
# layer (what peft's `target_modules="all-linear"` adapts, without the LM head). Gemma 3 as the text model
# (`gemma3_text`, e.g. gemma-3-1b); the multimodal `gemma3` also has a vision tower, whose layers would match too.
DECODER_TARGET_ROLES = {
    **{
        model_type: _LLAMA_STYLE_ROLES
        for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2")
    },
    "phi3": _PHI3_ROLES,
    "gpt2": _GPT2_ROLES,
    "gpt_neox": _GPT_NEOX_ROLES,
    "opt": _OPT_ROLES,
}

# Every architecture with default targets.
TARGET_ROLES_BY_MODEL_TYPE = {**ENCODER_TARGET_ROLES, **DECODER_TARGET_ROLES}

# The numbered transformer layers: `encoder.layer.N` (BERT family, DistilBERT's `transformer.layer.N`), `layers.N`
# (Llama family, GPT-NeoX, OPT's `decoder.layers.N`) and `h.N` (GPT-2).
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h)\.(\d+)\.")
_LAYER_PART = re.compile(r"(?:^|\.)(?:layer|layers|h)\.\d+\.")


def role_pattern(suffix: str) -> re.Pattern:
    # Anchored at a name boundary, so that e.g. `crossattention.self.query` is not a `query`.
    return re.compile(r"(?:^|\.)(?:" + suffix + r")$")


def module_role(module_name: str) -> Optional[str]:
    """
    The role of a module in its transformer layer for any architecture of `TARGET_ROLES_BY_MODEL_TYPE` (a suffix that
    two tables share has the same role in both), else the part of the name after the layer number (a custom target),
    or `None` outside the layers.
    """
    for roles in TARGET_ROLES_BY_MODEL_TYPE.values():
        for role, suffix in roles.items():
            if role_pattern(suffix).search(module_name):
                return role
    match = _LAYER_PART.search(module_name)
    return module_name[match.end() :] if match else None


def layer_index(module_name: str) -> Optional[int]:
    """
    The transformer layer a module belongs to (`roberta.encoder.layer.3.attention...`, DistilBERT's
    `distilbert.transformer.layer.3.ffn.lin1`, Llama's `model.layers.3.mlp.up_proj`, GPT-2's `transformer.h.3.mlp.c_fc`
    → 3), or `None`.
    """
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None
