"""Default LoRA targets, the task head and the Fisher proxy on every supported encoder architecture (tiny configs)."""

from typing import Optional

import pytest
import torch
from conftest import (
    PAD_ID,
    ROLES,
    SEQ_LEN,
    TINY_ENCODER,
    VOCAB,
    SequentialFWLoraTrainer,
    TokenDataset,
    rows,
    training_args,
)
from peft import get_peft_model_state_dict
from references import reference_sq_grad_norms
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DebertaConfig,
    DebertaForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from fw_trainer import FWLoraArguments, build_peft_model, resolve_target_modules
from fw_trainer.architectures import ENCODER_TARGET_ROLES, TARGET_ROLES_BY_MODEL_TYPE, layer_index, role_pattern
from fw_trainer.heatmap import layer_role_grid


NUM_LAYERS = TINY_ENCODER["num_hidden_layers"]

# Per architecture: the model class and config, the encoder layers' prefix and the six layers of every encoder layer
# (q, k, v, attention output, FFN in, FFN out), spelled out from the transformers modeling files.
BERT_ROLES = ROLES
DEBERTA_V2_ROLES = (
    "attention.self.query_proj",
    "attention.self.key_proj",
    "attention.self.value_proj",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
DISTILBERT_ROLES = (
    "attention.q_lin",
    "attention.k_lin",
    "attention.v_lin",
    "attention.out_lin",
    "ffn.lin1",
    "ffn.lin2",
)
ARCHITECTURES = {
    "bert": (BertForSequenceClassification, BertConfig(**TINY_ENCODER), "bert.encoder.layer", BERT_ROLES),
    "roberta": (RobertaForSequenceClassification, RobertaConfig(**TINY_ENCODER), "roberta.encoder.layer", BERT_ROLES),
    "xlm-roberta": (
        XLMRobertaForSequenceClassification,
        XLMRobertaConfig(**TINY_ENCODER),
        "roberta.encoder.layer",
        BERT_ROLES,
    ),
    # embedding_size != hidden_size gives ELECTRA-small's `electra.embeddings_project`, which is no target.
    "electra": (
        ElectraForSequenceClassification,
        ElectraConfig(embedding_size=16, **TINY_ENCODER),
        "electra.encoder.layer",
        BERT_ROLES,
    ),
    # DeBERTa-v2 defaults: absolute positions, no relative attention.
    "deberta-v2": (
        DebertaV2ForSequenceClassification,
        DebertaV2Config(**TINY_ENCODER),
        "deberta.encoder.layer",
        DEBERTA_V2_ROLES,
    ),
    # DeBERTa-v3-base's disentangled attention; `share_att_key=False` adds `pos_key_proj`/`pos_query_proj` linear
    # layers to every attention, which must not be taken for the key and query.
    "deberta-v3-relative": (
        DebertaV2ForSequenceClassification,
        DebertaV2Config(
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            position_buckets=8,
            norm_rel_ebd="layer_norm",
            share_att_key=False,
            **TINY_ENCODER,
        ),
        "deberta.encoder.layer",
        DEBERTA_V2_ROLES,
    ),
    "distilbert": (
        DistilBertForSequenceClassification,
        DistilBertConfig(
            vocab_size=VOCAB,
            dim=32,
            hidden_dim=48,
            n_layers=NUM_LAYERS,
            n_heads=4,
            max_position_embeddings=SEQ_LEN + 4,
            dropout=0.0,
            attention_dropout=0.0,
            seq_classif_dropout=0.0,
            num_labels=2,
            pad_token_id=PAD_ID,
        ),
        "distilbert.transformer.layer",
        DISTILBERT_ROLES,
    ),
}
# Linear layers of each task model that are never default targets: poolers, heads, projections outside the layers.
NON_TARGETS = {
    "bert": ["bert.pooler.dense", "classifier"],
    "roberta": ["classifier.dense", "classifier.out_proj"],
    "xlm-roberta": ["classifier.dense", "classifier.out_proj"],
    "electra": ["electra.embeddings_project", "classifier.dense", "classifier.out_proj"],
    "deberta-v2": ["pooler.dense", "classifier"],
    "deberta-v3-relative": [
        *(
            f"deberta.encoder.layer.{i}.attention.self.{proj}"
            for i in range(NUM_LAYERS)
            for proj in ("pos_key_proj", "pos_query_proj")
        ),
        "pooler.dense",
        "classifier",
    ],
    "distilbert": ["pre_classifier", "classifier"],
}


def tiny_model(architecture: str, seed: int = 0):
    model_cls, config, _, _ = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    return model_cls(config)


def expected_targets(architecture: str) -> list[str]:
    _, _, layers, roles = ARCHITECTURES[architecture]
    return [f"{layers}.{i}.{role}" for i in range(NUM_LAYERS) for role in roles]


def linear_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def target_role(model_type: str, module_name: str) -> Optional[str]:
    """The role that a module plays in its transformer layer by the default-target table of its architecture (peft's
    `base_model.model.` prefix does not matter): one of `TARGET_ROLES`, or `None` if the name plays none of them or
    `model_type` has no default targets."""
    roles = TARGET_ROLES_BY_MODEL_TYPE.get(model_type)
    if roles is None:
        return None
    for role, suffix in roles.items():
        if role_pattern(suffix).search(module_name):
            return role
    return None


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_default_targets_are_the_six_roles_of_every_layer(architecture):
    model = tiny_model(architecture)
    targets = resolve_target_modules(model)
    assert targets == expected_targets(architecture)
    # Every linear layer is either one of the six roles or one of the known non-targets: the lists are complete.
    assert sorted(linear_names(model)) == sorted(targets + NON_TARGETS[architecture])


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_poolers_and_heads_are_never_default_targets(architecture):
    targets = resolve_target_modules(tiny_model(architecture))
    assert not set(targets) & set(NON_TARGETS[architecture])
    assert not any(part in ("pooler", "classifier", "pre_classifier") for name in targets for part in name.split("."))


def test_explicit_targets_never_reach_the_head():
    # DeBERTa's ContextPooler is head (trained in full): an explicit "dense" leaves it out, unlike BERT's pooler,
    # which is part of the backbone (tests/test_model_builder.py).
    dense = resolve_target_modules(tiny_model("deberta-v2"), ["dense"])
    assert dense == [f"deberta.encoder.layer.{i}.{role}" for i in range(NUM_LAYERS) for role in DEBERTA_V2_ROLES[3:]]
    with pytest.raises(ValueError, match="'pre_classifier' matches no linear layer"):
        resolve_target_modules(tiny_model("distilbert"), ["pre_classifier"])


def test_deberta_v1_has_no_default_and_says_how_to_pass_targets():
    # DeBERTa v1 fuses q, k and v into one `in_proj`: the six roles do not exist as separate layers.
    config = DebertaConfig(**TINY_ENCODER)
    with pytest.raises(ValueError, match="No default LoRA targets .* 'deberta'.*--lora_target_modules"):
        resolve_target_modules(DebertaForSequenceClassification(config))


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_fisher_after_one_step_equals_autograd(architecture, tmp_path):
    dataset = TokenDataset(size=8)
    assert (dataset.attention_mask == 0).any(), "the batch must contain padding"
    fw_args = FWLoraArguments(method="fw_lora", fw_warmup_steps=1)
    model, summary = build_peft_model(tiny_model(architecture), fw_args)
    assert summary.target_modules == expected_targets(architecture)
    expected = reference_sq_grad_norms(model, rows(dataset, 0, 8))
    assert (expected > 0).all(), "every adapted weight should get a gradient"

    trainer = SequentialFWLoraTrainer(
        model=model, args=training_args(tmp_path, max_steps=2), train_dataset=dataset, fw_args=fw_args
    )
    trainer.train()

    callback = trainer.fisher_callback
    assert [matrix.name for matrix in callback.matrices] == expected_targets(architecture)
    assert callback.frozen and callback.frozen_at_step == 1
    torch.testing.assert_close(callback.fisher, expected, rtol=1e-4, atol=0)
    assert torch.isfinite(torch.tensor([log["loss"] for log in trainer.state.log_history if "loss" in log])).all()


@pytest.mark.parametrize(
    "model_type, name, role",
    [
        ("bert", "bert.encoder.layer.0.attention.self.query", "query"),
        ("roberta", "base_model.model.roberta.encoder.layer.11.attention.output.dense", "attention_output"),
        ("roberta", "roberta.encoder.layer.11.output.dense", "ffn_out"),
        ("xlm-roberta", "roberta.encoder.layer.3.intermediate.dense", "ffn_in"),
        ("electra", "electra.encoder.layer.1.attention.self.value", "value"),
        ("deberta-v2", "deberta.encoder.layer.5.attention.self.key_proj", "key"),
        ("deberta-v2", "deberta.encoder.layer.5.output.dense", "ffn_out"),
        ("distilbert", "distilbert.transformer.layer.0.attention.out_lin", "attention_output"),
        ("distilbert", "distilbert.transformer.layer.5.ffn.lin1", "ffn_in"),
        # Not a role: poolers, heads, DeBERTa's relative-position projections, names of another architecture.
        ("bert", "bert.pooler.dense", None),
        ("roberta", "classifier.dense", None),
        ("deberta-v2", "pooler.dense", None),
        ("deberta-v2", "deberta.encoder.layer.0.attention.self.pos_key_proj", None),
        ("deberta-v2", "deberta.encoder.layer.0.attention.self.query", None),
        ("distilbert", "pre_classifier", None),
        ("bert", "bert.encoder.layer.0.crossattention.self.query", None),
        ("gpt2", "transformer.h.0.attn.c_attn", "qkv"),
        ("gpt2", "transformer.h.0.attn.c_proj", "attention_output"),
        ("gpt2", "transformer.h.0.mlp.c_proj", "ffn_out"),
        ("llama", "base_model.model.model.layers.3.mlp.gate_proj", "ffn_gate"),
        ("llama", "model.layers.3.mlp.up_proj", "ffn_in"),
        ("gpt_neox", "gpt_neox.layers.0.attention.dense", "attention_output"),
        ("phi3", "model.layers.0.mlp.gate_up_proj", "ffn_gate_up"),
        ("bert", "transformer.h.0.attn.c_attn", None),
        ("llama", "lm_head", None),
    ],
)
def test_target_role(model_type, name, role):
    assert target_role(model_type, name) == role


def test_layer_index_of_distilbert_names():
    assert layer_index("distilbert.transformer.layer.0.attention.q_lin") == 0
    assert layer_index("base_model.model.distilbert.transformer.layer.5.ffn.lin2") == 5
    assert layer_index("pre_classifier") is None


@pytest.mark.parametrize(
    "architecture, head", [("distilbert", ("pre_classifier", "classifier")), ("deberta-v2", ("pooler", "classifier"))]
)
def test_whole_head_is_trained_and_saved(architecture, head):
    """DistilBERT's `pre_classifier` and DeBERTa's pooler are trained in full (and saved) with the classifier."""
    base = tiny_model(architecture)
    head_params = sum(p.numel() for name, p in base.named_parameters() if name.split(".")[0] in head)
    model, summary = build_peft_model(base, FWLoraArguments(method="fw_lora", lora_r=4))

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for module in head:
        assert any(name.startswith(f"base_model.model.{module}.modules_to_save.default.") for name in trainable)
    # Besides the head copies only the LoRA factors train: every pretrained weight is frozen.
    assert all("lora_" in name or ".modules_to_save.default." in name for name in trainable)
    assert not any(p.requires_grad for name, p in model.named_parameters() if ".original_module." in name)
    assert summary.head_params == head_params
    assert summary.trainable_params == summary.adapter_params + head_params

    # The head gets gradients and is part of the saved adapter.
    model(**rows(TokenDataset(size=8), 0, 8)).loss.backward()
    for module in head:
        copy = model.get_submodule(f"base_model.model.{module}.modules_to_save.default")
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in copy.parameters())
    saved = get_peft_model_state_dict(model)
    for module in head:
        assert any(key.startswith(f"base_model.model.{module}.") for key in saved)


def test_bert_pooler_stays_a_frozen_backbone_layer():
    model, summary = build_peft_model(tiny_model("bert"), FWLoraArguments(method="lora"))
    assert not any(p.requires_grad for name, p in model.named_parameters() if "pooler" in name)
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_heatmap_grid_reads_every_architecture(architecture):
    """The figures' layer × role grid comes from the same tables as the targets: all six roles of every layer,
    in encoder order, whatever the architecture's module names."""
    names = expected_targets(architecture)
    grid, layers, roles = layer_role_grid({name: float(i) for i, name in enumerate(names)})
    assert layers == list(range(NUM_LAYERS)) and roles == list(ENCODER_TARGET_ROLES["bert"])
    assert grid.tolist() == [[float(6 * layer + j) for j in range(6)] for layer in range(NUM_LAYERS)]
