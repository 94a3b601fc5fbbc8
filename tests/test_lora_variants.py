"""Every peft LoRA variant and adapter layout is either measured and penalised exactly (F against autograd, the
penalty against `get_delta_weight`, on the adapter that trains) or refused before training with one error that names
the option or adapter."""

import pytest
import torch
from conftest import SequentialFWLoraTrainer, lora_weights, training_args
from peft import get_peft_model
from references import reference_fisher_under_accumulation
from tiny_decoders import CausalLMDataset, decoder_lora_config, expected_decoder_targets, tiny_decoder
from torch import nn

from fw_trainer import FisherEstimator, FWLoraArguments, FWLoraTrainer, find_adapted_matrices
from fw_trainer.adapted_matrices import delta_weight_norms
from fw_trainer.errors import UsageError
from fw_trainer.run_environment import adapter_file_bytes


def lora_config(**kwargs):
    return decoder_lora_config("llama", **kwargs)


def fw_trainer(model, tmp_path, method="fw_lora", **kwargs):
    fw_args = FWLoraArguments(method=method, fw_warmup_steps=1, **kwargs)
    args = training_args(tmp_path, per_device_train_batch_size=4, max_steps=3)
    return SequentialFWLoraTrainer(model=model, args=args, train_dataset=CausalLMDataset(size=12), fw_args=fw_args)


# Options that change what the Fisher tap or the penalty would have to be: refused by FW-LoRA, trained by plain LoRA.
REFUSED = [
    ({"use_dora": True}, "use_dora=True"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ({"lora_bias": True}, "lora_bias=True"),
]


@pytest.mark.parametrize("options, named", REFUSED, ids=[named for _, named in REFUSED])
def test_variants_that_would_be_measured_wrong_are_refused_before_training(tmp_path, options, named):
    model = get_peft_model(tiny_decoder("llama"), lora_config(**options))
    for build in (lambda: FisherEstimator(model), lambda: fw_trainer(model, tmp_path)):
        with pytest.raises(UsageError, match=named.replace("(", r"\(").replace(")", r"\)")):
            build()
    # The same adapter is a valid baseline: plain LoRA measures and penalises nothing.
    fw_trainer(model, tmp_path, method="lora").train()


@pytest.mark.parametrize(
    "options", [{"use_rslora": True}, {"init_lora_weights": "gaussian"}, {"init_lora_weights": False}], ids=str
)
def test_measured_variants_equal_autograd(tmp_path, options):
    dataset = CausalLMDataset(size=4, seed=1)
    model = get_peft_model(tiny_decoder("llama"), lora_config(**options))
    trainer = fw_trainer(model, tmp_path, fw_estimator="exact")
    expected = reference_fisher_under_accumulation(
        model, [dataset.rows(0, 4)], int((dataset.labels[:, 1:] != -100).sum())
    )
    trainer.train_dataset = dataset
    trainer.args.max_steps = 1
    trainer.train()
    torch.testing.assert_close(trainer.fisher_callback.fisher, expected, rtol=1e-4, atol=0)


def test_the_penalty_reaches_the_active_adapter_of_several(tmp_path):
    """Before the fix the penalty went to the inactive `default` adapter: λ = 100 trained exactly as λ = 0."""

    def trained(fw_lambda):
        torch.manual_seed(0)
        model = get_peft_model(tiny_decoder("llama"), lora_config(init_lora_weights="gaussian"))
        model.add_adapter("sst2", lora_config(init_lora_weights="gaussian"))
        model.set_adapter("sst2")
        assert {m.adapter_name for m in find_adapted_matrices(model)} == {"sst2"}
        trainer = fw_trainer(model, tmp_path / str(fw_lambda), fw_lambda=fw_lambda)
        trainer.train()
        return lora_weights(trainer.model)

    unpenalised, penalised = trained(0.0), trained(100.0)
    sst2 = [name for name in unpenalised if ".sst2." in name]
    default = [name for name in unpenalised if ".default." in name]
    assert sst2 and default
    # The inactive adapter does not train; the active one is pulled towards zero by the penalty.
    assert all(torch.equal(unpenalised[name], penalised[name]) for name in default)
    assert sum(penalised[n].norm() for n in sst2) < sum(unpenalised[n].norm() for n in sst2)


def test_an_adapter_of_another_name_is_used_saved_and_resumed(tmp_path):
    """peft saves an adapter not named "default" in a subfolder of that name: its size, identity, norms and checkpoint
    are found there (before, the identity lost the rank and targets and a resume found no adapter)."""
    model = get_peft_model(tiny_decoder("llama"), lora_config(init_lora_weights="gaussian"), adapter_name="task")
    assert {m.adapter_name for m in find_adapted_matrices(model)} == {"task"}
    with pytest.raises(UsageError, match="'default' was asked for, but the adapter that is active .* is 'task'"):
        find_adapted_matrices(model, "default")

    trainer = fw_trainer(model, tmp_path)
    trainer.args.save_strategy, trainer.args.save_steps = "steps", 2
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    saved = checkpoint / "task" / "adapter_model.safetensors"
    assert adapter_file_bytes(str(checkpoint), "task") == saved.stat().st_size > 0
    identity = trainer.identity()["run"]
    assert identity["rank"] == 4 and identity["target_modules"] == sorted(expected_decoder_targets("llama"))
    assert delta_weight_norms(trainer.model).keys() == {m.name for m in find_adapted_matrices(model)}

    same_run = lora_config(init_lora_weights="gaussian")  # the identity records the initialisation
    resumed = fw_trainer(get_peft_model(tiny_decoder("llama"), same_run, adapter_name="task"), tmp_path)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3 and resumed.fisher_callback.frozen_at_step == 1


def test_several_active_adapters_are_refused(tmp_path):
    model = get_peft_model(tiny_decoder("llama"), lora_config())
    model.add_adapter("other", lora_config())
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(UsageError, match="2 active LoRA adapters \\('default', 'other'\\)"):
        fw_trainer(model, tmp_path)


@pytest.mark.parametrize("method", ["lora", "fw_lora"])
def test_a_model_without_adapters_is_refused_under_a_lora_method(tmp_path, method):
    """Before the fix `method="lora"` trained every parameter of such a model under the LoRA label."""
    with pytest.raises(UsageError, match="has no LoRA adapter"):
        fw_trainer(tiny_decoder("llama"), tmp_path, method=method)
    fw_trainer(tiny_decoder("llama"), tmp_path, method="full")  # full fine-tuning is what it is


class PackedLinear(nn.Linear):
    """A linear layer whose weight is stored packed, as bitsandbytes' `Linear4bit` (an `nn.Linear` subclass) holds a
    `(N, 1)` uint8 tensor: `weight.shape` is not the matrix's."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        self.weight = nn.Parameter(
            torch.zeros(linear.in_features * linear.out_features // 2, 1, dtype=torch.uint8), requires_grad=False
        )


def test_a_quantised_base_is_refused(tmp_path):
    base = tiny_decoder("llama")
    attention = base.model.layers[0].self_attn
    attention.q_proj = PackedLinear(attention.q_proj)
    model = get_peft_model(base, lora_config())
    with pytest.raises(UsageError, match="model.layers.0.self_attn.q_proj.*quantised or packed weight"):
        FWLoraTrainer(model=model, args=training_args(tmp_path), fw_args=FWLoraArguments(method="fw_lora"))


def test_a_trial_model_built_by_model_init_is_checked_too(tmp_path):
    """A hyper-parameter search builds each trial's model inside `train()`: it gets the same checks as the first."""
    trainer = fw_trainer(get_peft_model(tiny_decoder("llama"), lora_config()), tmp_path)
    trainer.model_init = lambda trial=None: get_peft_model(tiny_decoder("llama"), lora_config(use_dora=True))
    with pytest.raises(UsageError, match="use_dora=True"):
        trainer.train()


def test_a_tied_lm_head_named_as_a_target_is_refused(tmp_path):
    """Gemma ties its LM head to the input embedding: its gradient has an embedding part the tap does not see."""
    base = tiny_decoder("gemma")
    assert base.lm_head.weight is base.get_input_embeddings().weight
    model = get_peft_model(base, decoder_lora_config("gemma", target_modules=["q_proj", "lm_head"]))
    with pytest.raises(UsageError, match="`lm_head` shares its weight with an embedding"):
        fw_trainer(model, tmp_path)


def test_a_merged_adapter_is_refused():
    model = get_peft_model(tiny_decoder("llama"), lora_config())
    model.merge_adapter()
    with pytest.raises(UsageError, match="merged into the base weight"):
        find_adapted_matrices(model)
