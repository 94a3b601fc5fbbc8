"""Tiny random decoder LLMs of every family with default LoRA targets, and causal-LM data with padding and -100 labels:
no network, seconds per test."""

import torch
import transformers
from peft import LoraConfig
from transformers import AutoModelForCausalLM


DECODER_VOCAB = 64
DECODER_SEQ_LEN = 10
_SMALL = dict(
    vocab_size=DECODER_VOCAB,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=32,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_GQA = dict(_SMALL, num_key_value_heads=1)

# model_type → (config class, config kwargs, the adapted roles of one layer as module-name suffixes, in module order),
# spelled out here rather than taken from fw_trainer, so that tests check the default targets against an independent
# list.
DECODERS = {
    "llama": (
        transformers.LlamaConfig,
        _GQA,
        (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ),
    ),
    "mistral": (transformers.MistralConfig, _GQA, None),
    "qwen2": (transformers.Qwen2Config, _GQA, None),
    "qwen3": (transformers.Qwen3Config, dict(_GQA, head_dim=8), None),
    "gemma": (transformers.GemmaConfig, dict(_GQA, head_dim=8), None),
    "gemma2": (transformers.Gemma2Config, dict(_GQA, head_dim=8), None),
    "gemma3_text": (transformers.Gemma3TextConfig, dict(_GQA, head_dim=8), None),
    "phi3": (
        transformers.Phi3Config,
        _GQA,
        ("self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    ),
    "gpt2": (
        transformers.GPT2Config,
        dict(vocab_size=DECODER_VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=2),
        ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    ),
    "gpt_neox": (
        transformers.GPTNeoXConfig,
        _SMALL,
        ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ),
    "opt": (
        transformers.OPTConfig,
        dict(_SMALL, ffn_dim=24, word_embed_proj_dim=16),
        ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"),
    ),
}
# The Llama layout's roles, for the families that share it.
for _name, (_config, _kwargs, _roles) in list(DECODERS.items()):
    if _roles is None:
        DECODERS[_name] = (_config, _kwargs, DECODERS["llama"][2])
# Where each family numbers its layers.
LAYER_PREFIX = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers"}


def tiny_decoder(model_type: str, seed: int = 0, task: type = AutoModelForCausalLM, **overrides):
    """A tiny random model of `model_type` (a causal LM by default; `task` e.g. `AutoModelForSequenceClassification`),
    dropout off, fp32."""
    config_class, kwargs, _ = DECODERS[model_type]
    config = config_class(**{**kwargs, **overrides})
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    torch.manual_seed(seed)
    return task.from_config(config, dtype=torch.float32)


def expected_decoder_targets(model_type: str, num_layers: int = 2) -> list[str]:
    prefix = LAYER_PREFIX.get(model_type, "model.layers")
    return [f"{prefix}.{i}.{role}" for i in range(num_layers) for role in DECODERS[model_type][2]]


class CausalLMDataset(torch.utils.data.Dataset):
    """Random token rows, right-padded to random lengths, whose labels are the tokens with padding and a random
    prompt prefix set to -100: micro-batches then hold different numbers of label tokens."""

    def __init__(self, size: int = 16, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(3, DECODER_VOCAB, (size, DECODER_SEQ_LEN), generator=generator)
        lengths = torch.randint(3, DECODER_SEQ_LEN + 1, (size,), generator=generator)
        positions = torch.arange(DECODER_SEQ_LEN)[None, :]
        self.attention_mask = (positions < lengths[:, None]).long()
        self.input_ids[self.attention_mask == 0] = 0
        prompt = torch.randint(0, 3, (size,), generator=generator)
        self.labels = self.input_ids.clone()
        self.labels[(self.attention_mask == 0) | (positions < prompt[:, None])] = -100

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}

    def rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key)[start:stop] for key in ("input_ids", "attention_mask", "labels")}


def decoder_lora_config(model_type: str, **kwargs) -> LoraConfig:
    """A causal-LM `LoraConfig` of rank 4 on the family's default targets, with `kwargs` (peft's options) on top."""
    return LoraConfig(
        **{
            "task_type": "CAUSAL_LM",
            "r": 4,
            "lora_alpha": 8,
            "target_modules": expected_decoder_targets(model_type),
            **kwargs,
        }
    )
