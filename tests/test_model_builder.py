"""Target resolution, the budget solver and the adapter summary against counts made by hand."""

import pytest
import torch
from conftest import ROLES, tiny_roberta
from peft import PeftModel
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from fw_trainer import FWLoraArguments, build_peft_model, rank_for_budget, resolve_target_modules


def roberta_base_on_meta():
    """roberta-base's shapes without allocating its weights."""
    with torch.device("meta"):
        config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)
        return RobertaForSequenceClassification(config)


def expected_targets(prefix, num_layers):
    return [f"{prefix}.encoder.layer.{i}.{role}" for i in range(num_layers) for role in ROLES]


def test_default_targets_are_six_roles_per_layer():
    assert resolve_target_modules(tiny_roberta()) == expected_targets("roberta", 2)
    assert resolve_target_modules(roberta_base_on_meta()) == expected_targets("roberta", 12)


def test_bert_pooler_and_classifier_are_never_targets():
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24
    )
    model = BertForSequenceClassification(config)
    targets = resolve_target_modules(model)
    assert targets == expected_targets("bert", 2)
    assert not any("pooler" in name or "classifier" in name for name in targets)
    # An explicit "dense" matches every dense layer but the classification head's.
    dense = resolve_target_modules(model, ["dense"])
    assert "bert.pooler.dense" in dense and not any("classifier" in name for name in dense)


@pytest.mark.parametrize("budget, rank, percent", [(0.1, 1, 0.133), (0.2, 2, 0.266), (0.5, 4, 0.532)])
def test_budget_to_rank_on_roberta_base(budget, rank, percent):
    model = roberta_base_on_meta()
    targets = resolve_target_modules(model)
    base = sum(p.numel() for p in model.parameters())
    assert round(base / 1e6, 1) == 124.6
    assert rank_for_budget(model, targets, budget) == rank
    # 13,824 r parameters per layer, 12 layers.
    assert round(100 * rank * 13_824 * 12 / base, 3) == percent


def test_summary_counts_match_the_model():
    args = FWLoraArguments(method="fw_lora", lora_r=4)
    base = tiny_roberta()
    base_params = sum(p.numel() for p in base.parameters())
    shapes = {name: (m.in_features, m.out_features) for name, m in base.named_modules() if hasattr(m, "in_features")}
    model, summary = build_peft_model(base, args)

    assert isinstance(model, PeftModel)
    assert summary.target_modules == expected_targets("roberta", 2)
    assert summary.adapter_params == 4 * sum(sum(shapes[name]) for name in summary.target_modules)
    assert summary.head_params == sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n
    )
    assert summary.trainable_params == summary.adapter_params + summary.head_params
    assert summary.base_params == base_params
    assert summary.adapter_percent == pytest.approx(100 * summary.adapter_params / base_params)
    assert "adapted matrices: 12" in summary.format()


def test_lora_and_fw_lora_get_the_same_adapters():
    lora, lora_summary = build_peft_model(tiny_roberta(), FWLoraArguments(method="lora"))
    fw, fw_summary = build_peft_model(tiny_roberta(), FWLoraArguments(method="fw_lora"))
    assert lora_summary.target_modules == fw_summary.target_modules
    assert lora_summary.adapter_params == fw_summary.adapter_params
    assert lora.peft_config["default"].to_dict() == fw.peft_config["default"].to_dict()


def test_adalora_budget_is_the_final_average_rank():
    model, summary = build_peft_model(tiny_roberta(), FWLoraArguments(method="adalora", lora_r=4))
    config = model.peft_config["default"]
    assert (config.target_r, config.init_r) == (4, 6)
    assert (summary.rank, summary.init_rank) == (4, 6)


def test_full_fine_tuning_trains_everything():
    base = tiny_roberta()
    model, summary = build_peft_model(base, FWLoraArguments(method="full"))
    assert model is base and summary.trainable_params == sum(p.numel() for p in base.parameters())


def test_targets_that_match_nothing_are_rejected():
    with pytest.raises(ValueError, match="'query_proj' matches no linear layer"):
        build_peft_model(tiny_roberta(), FWLoraArguments(lora_target_modules=["query", "query_proj"]))


def test_unknown_architecture_asks_for_explicit_targets():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="--lora_target_modules"):
        resolve_target_modules(model)


def test_budget_too_small_for_rank_one():
    with pytest.raises(ValueError, match="too small for rank 1"):
        build_peft_model(tiny_roberta(), FWLoraArguments(lora_budget=0.01))


def test_default_targets_need_every_role():
    model = tiny_roberta()
    for layer in model.roberta.encoder.layer:
        layer.intermediate.dense = torch.nn.Identity()  # an unusual layout: no FFN-in linear layer
    with pytest.raises(ValueError, match="no layer for the role\\(s\\) ffn_in"):
        resolve_target_modules(model)
