"""FW-LoRA on quantised bases, loaded as a user would (`from_pretrained(quantization_config=BitsAndBytesConfig(...))`;
bitsandbytes quantises on the CPU): 4-bit (QLoRA) bases are measured and trained, F against autograd on the same
model with every 4-bit layer replaced by its dequantised float weight; 8-bit bases are refused."""

import copy

import pytest
import torch
from conftest import SequentialFWLoraTrainer, lora_weights, training_args
from peft import get_peft_model
from references import brute_force_penalty, reference_sq_grad_norms
from tiny_decoders import CausalLMDataset, decoder_lora_config, tiny_decoder
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from fw_trainer import FisherEstimator, FisherWeightedPenalty, FWLoraArguments, find_adapted_matrices
from fw_trainer.errors import UsageError


bnb = pytest.importorskip("bitsandbytes")
FOUR_BIT = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved to disk (bitsandbytes' CPU kernels want output sizes that are multiples of 32)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    tiny_decoder("llama", **shape).save_pretrained(path)
    return str(path)


def four_bit_model_and_its_float_twin(model_dir):
    quantised = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=FOUR_BIT, dtype=torch.float32)
    twin = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, module in quantised.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            twin.get_submodule(name).weight.data.copy_(weight)
    config = decoder_lora_config("llama", init_lora_weights="gaussian")
    torch.manual_seed(0)
    quantised = get_peft_model(quantised, copy.deepcopy(config))
    torch.manual_seed(0)
    return quantised, get_peft_model(twin, config)


def test_four_bit_fisher_equals_autograd_on_the_dequantised_weights(model_dir):
    quantised, twin = four_bit_model_and_its_float_twin(model_dir)
    matrices = find_adapted_matrices(quantised)
    assert type(matrices[0].layer.get_base_layer()) is bnb.nn.Linear4bit
    assert matrices[0].base_weight.dtype == torch.uint8 and (matrices[0].d_out, matrices[0].d_in) == (64, 64)
    batch = CausalLMDataset(size=4).rows(0, 4)

    estimator = FisherEstimator(quantised, estimator="exact")
    estimator.start()
    quantised.train()
    estimator.loss_to_backpropagate(quantised(**batch).loss).backward()
    estimator.fold_micro_batch()
    estimator.end_step()
    estimator.stop()

    expected = reference_sq_grad_norms(twin, batch)
    # The 4-bit kernel rounds differently from a float matmul with the dequantised weight (the losses agree to about
    # 1e-5, F to about 0.2 %): the tolerance is that rounding, not the method's.
    torch.testing.assert_close(estimator.fisher, expected, rtol=2e-2, atol=0)

    weights = torch.rand(len(matrices))
    brute_force = brute_force_penalty(matrices, weights)
    torch.testing.assert_close(FisherWeightedPenalty(matrices, weights)(), brute_force, rtol=1e-5, atol=0)


def test_fw_lora_trains_a_four_bit_base(model_dir, tmp_path):
    quantised, _ = four_bit_model_and_its_float_twin(model_dir)
    packed = {name: p.detach().clone() for name, p in quantised.named_parameters() if p.dtype == torch.uint8}
    before = lora_weights(quantised)
    fw_args = FWLoraArguments(method="fw_lora", fw_warmup_steps=2, fw_lambda=1.0)
    args = training_args(tmp_path, per_device_train_batch_size=4, max_steps=4)
    trainer = SequentialFWLoraTrainer(model=quantised, args=args, train_dataset=CausalLMDataset(16), fw_args=fw_args)
    trainer.train()
    assert trainer.fisher_callback.frozen_at_step == 2 and torch.isfinite(trainer.fisher_callback.fisher).all()
    assert any("fw_penalty" in log for log in trainer.state.log_history)
    after = dict(quantised.named_parameters())
    assert all(not torch.equal(after[name], value) for name, value in before.items() if "lora_B" in name)
    assert all(torch.equal(after[name], value) for name, value in packed.items())


def test_an_eight_bit_base_is_refused(model_dir, tmp_path):
    eight_bit = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float32
    )
    model = get_peft_model(eight_bit, decoder_lora_config("llama"))
    with pytest.raises(
        UsageError, match="Linear8bitLt.*quantised or packed weight.*8-bit bases quantise the activations"
    ):
        find_adapted_matrices(model)
