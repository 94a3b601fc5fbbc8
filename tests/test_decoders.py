"""FW-LoRA on decoder LLMs (tiny random configs of every family with default targets): default targets and roles, only
the adapters train, F against autograd and λ = 0 against a plain `Trainer` under gradient accumulation with -100
labels, and the penalty against peft's own `get_delta_weight`, for both weight layouts (`nn.Linear`, GPT-2's
`Conv1D`)."""

import copy

import pytest
import torch
from conftest import SequentialFWLoraTrainer, lora_weights, training_args
from peft import get_peft_model
from references import brute_force_penalty, reference_fisher_under_accumulation
from tiny_decoders import DECODERS, CausalLMDataset, decoder_lora_config, expected_decoder_targets, tiny_decoder
from torch.utils.data import SequentialSampler
from transformers import AutoModelForSequenceClassification, Trainer

from fw_trainer import (
    FisherWeightedPenalty,
    FWLoraArguments,
    build_peft_model,
    find_adapted_matrices,
    resolve_target_modules,
)
from fw_trainer.architectures import TARGET_ROLES
from fw_trainer.heatmap import layer_role_grid


# One family per weight layout: `nn.Linear` (Llama) and `Conv1D` with `fan_in_fan_out` (GPT-2).
LAYOUTS = ["llama", "gpt2"]


class SequentialTrainer(Trainer):
    """Batches in dataset order, so a test knows which rows every micro-batch holds."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(self.train_dataset)


@pytest.mark.parametrize("model_type", list(DECODERS))
def test_default_targets_roles_and_only_adapters_train(model_type):
    base = tiny_decoder(model_type)
    tied = base.config.tie_word_embeddings
    assert resolve_target_modules(base) == expected_decoder_targets(model_type)

    model, summary = build_peft_model(base, FWLoraArguments(method="fw_lora", lora_r=4))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    # A causal LM has no task head: the LM head stays frozen (and tied), only the LoRA factors train and count.
    assert trainable and all("lora_" in name for name in trainable)
    assert summary.head_params == 0
    assert (
        summary.trainable_params
        == summary.adapter_params
        == sum(p.numel() for p in model.parameters() if p.requires_grad)
    )
    assert model.peft_config["default"].modules_to_save is None
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # The heatmap has every layer and the family's roles, in forward order, with no hole.
    grid, layers, roles = layer_role_grid({name: 1.0 for name in summary.target_modules})
    assert layers == [0, 1] and len(roles) == len(DECODERS[model_type][2])
    assert roles == [role for role in TARGET_ROLES if role in roles]
    assert (grid == 1.0).all()


def test_llama_sequence_classification_trains_its_score_head():
    base = tiny_decoder("llama", task=AutoModelForSequenceClassification, num_labels=2)
    model, summary = build_peft_model(base, FWLoraArguments(method="fw_lora", lora_r=4))
    assert summary.target_modules == expected_decoder_targets("llama")
    assert summary.head_params == base.score.weight.numel() > 0
    assert summary.trainable_params == summary.adapter_params + summary.head_params


@pytest.mark.parametrize("model_type", list(DECODERS))
def test_fisher_equals_autograd_under_accumulation_with_ignored_labels(tmp_path, model_type):
    dataset = CausalLMDataset(size=8, seed=1)
    first, second = dataset.rows(0, 4), dataset.rows(4, 8)
    counts = [int((batch["labels"][:, 1:] != -100).sum()) for batch in (first, second)]
    assert counts[0] != counts[1] and (dataset.labels == -100).any(), "the test needs unequal label counts"
    fw_args = FWLoraArguments(method="fw_lora", lora_r=4, fw_warmup_steps=1, fw_estimator="exact")
    model, _ = build_peft_model(tiny_decoder(model_type), fw_args)
    trainer = SequentialFWLoraTrainer(
        model=model,
        args=training_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1),
        train_dataset=dataset,
        fw_args=fw_args,
    )
    # The step's label tokens as the Trainer counts them (shifted for `...ForCausalLM`; GPT-2's class name maps to no
    # loss type, so transformers counts its labels unshifted): part of the loss it optimises, not of what is tested
    # here.
    num_items = int(trainer._get_num_items_in_batch([first, second], torch.device("cpu")))
    shifted = sum(counts)
    assert num_items == (shifted if model_type != "gpt2" else int((dataset.labels != -100).sum()))
    expected = reference_fisher_under_accumulation(model, [first, second], num_items)
    trainer.train()
    torch.testing.assert_close(trainer.fisher_callback.fisher, expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("model_type", list(DECODERS))
def test_lambda_zero_trains_exactly_as_the_trainer_under_accumulation(tmp_path, model_type):
    """Before the fix FW-LoRA dropped `num_items_in_batch` and divided by the accumulation steps: the LoRA weights
    ended 180 % (relative) away from the Trainer's."""
    dataset = CausalLMDataset(size=16)
    fw_args = FWLoraArguments(method="fw_lora", lora_r=4, fw_warmup_steps=2, fw_lambda=0.0)
    args = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-2)
    # B = 0 at initialisation: a random B makes the first steps' gradients reach A too.
    config = decoder_lora_config(model_type, init_lora_weights="gaussian")

    def fresh():
        torch.manual_seed(1)
        return get_peft_model(tiny_decoder(model_type), copy.deepcopy(config))

    plain = SequentialTrainer(model=fresh(), args=training_args(tmp_path / "plain", **args), train_dataset=dataset)
    plain.train()
    fw = SequentialFWLoraTrainer(
        model=fresh(), args=training_args(tmp_path / "fw", **args), train_dataset=dataset, fw_args=fw_args
    )
    fw.train()
    assert fw.fisher_callback.frozen
    expected, actual = lora_weights(plain.model), lora_weights(fw.model)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    losses = [[log["loss"] for log in t.state.log_history if "loss" in log] for t in (plain, fw)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # With λ = 0 the reported task loss is the loss (not the micro-batch's share of the step's, GA times too small).
    assert [log["task_loss"] for log in fw.state.log_history if "loss" in log] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("model_type", LAYOUTS)
def test_penalty_equals_brute_force_with_get_delta_weight(model_type):
    torch.manual_seed(0)
    config = decoder_lora_config(
        model_type,
        init_lora_weights="gaussian",
        use_rslora=True,
        rank_pattern={r"mlp\..*": 2},
        alpha_pattern={r"mlp\..*": 3},
    )
    model = get_peft_model(tiny_decoder(model_type), config)
    matrices = find_adapted_matrices(model)
    assert {matrix.r for matrix in matrices} == {2, 4}
    weights = torch.rand(len(matrices))
    expected = brute_force_penalty(matrices, weights)
    torch.testing.assert_close(FisherWeightedPenalty(matrices, weights)(), expected, rtol=1e-5, atol=0)
    # ΔW has the base weight's layout (GPT-2's `Conv1D` stores `d_in × d_out`); `d_out`, `d_in` are the matrix's.
    for matrix in matrices:
        layout = (matrix.d_in, matrix.d_out) if model_type == "gpt2" else (matrix.d_out, matrix.d_in)
        assert matrix.layer.get_delta_weight("default").shape == matrix.base_weight.shape == layout


def test_adalora_on_a_causal_lm_trains_the_same_under_accumulation(tmp_path):
    """One step of 4 rows, or of 2 micro-batches of 2: the token-normalised loss and AdaLoRA's orthogonality term (once
    per step) are the same. Before the fix the term was added in full to each micro-batch: twice as strong."""
    dataset = CausalLMDataset(size=4, seed=1)
    fw_args = FWLoraArguments(method="adalora", lora_r=2, adalora_orth_reg_weight=5.0)

    def trained(batch_size, accumulation):
        torch.manual_seed(0)
        model, _ = build_peft_model(tiny_decoder("llama"), fw_args)
        args = training_args(
            tmp_path / str(accumulation),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=1e-2,
        )
        SequentialFWLoraTrainer(model=model, args=args, train_dataset=dataset, fw_args=fw_args).train()
        return lora_weights(model)

    whole, accumulated = trained(4, 1), trained(2, 2)
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)
