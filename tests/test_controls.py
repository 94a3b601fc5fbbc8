"""The study's controls of FW-LoRA's idea: the same penalty with uniform weights (`fw_power=0`) and with the frozen
importances assigned to the wrong matrices (`fw_shuffle_seed`), against hand computations of the weights."""

import json

import pytest
import torch
from conftest import SequentialFWLoraTrainer, TokenDataset, lora_model, training_args
from references import brute_force_penalty

from fw_trainer import FWLoraArguments, find_adapted_matrices
from fw_trainer.state_files import IMPORTANCE_FILE


def train(tmp_path, **fw_kwargs):
    model, fw_args = lora_model(fw_warmup_steps=2, fw_lambda=1e-2, **fw_kwargs)
    trainer = SequentialFWLoraTrainer(
        model=model, args=training_args(tmp_path, max_steps=3), train_dataset=TokenDataset(), fw_args=fw_args
    )
    trainer.train()
    return trainer, model


@pytest.mark.parametrize("normalization", ["sum", "max"])
def test_power_zero_is_the_same_penalty_with_every_weight_one(tmp_path, normalization):
    trainer, model = train(tmp_path, fw_power=0.0, fw_normalization=normalization)
    warmup = trainer.fisher_callback
    assert torch.equal(warmup.penalty_weights, torch.ones(12))
    torch.testing.assert_close(
        warmup.penalty(), brute_force_penalty(find_adapted_matrices(model), torch.ones(12)), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("normalization", ["sum", "max"])
def test_shuffled_importances_are_the_measured_ones_permuted_by_the_seed(tmp_path, normalization):
    trainer, model = train(tmp_path, fw_shuffle_seed=7, fw_normalization=normalization)
    reference, _ = train(tmp_path / "reference", fw_normalization=normalization)
    warmup = trainer.fisher_callback
    # The same measurement; by hand: the normalised F, then the permutation a generator seeded with 7 gives.
    torch.testing.assert_close(warmup.fisher, reference.fisher_callback.fisher, rtol=0, atol=0)
    fisher = warmup.fisher
    measured = fisher / (fisher.sum() if normalization == "sum" else fisher.max())
    permutation = torch.randperm(12, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(permutation, torch.arange(12))
    torch.testing.assert_close(warmup.importances, measured[permutation], rtol=1e-6, atol=0)
    # The same distribution of weights as the Fisher run's, on other matrices.
    weights = 1 - measured[permutation]
    torch.testing.assert_close(warmup.penalty_weights, weights, rtol=1e-6, atol=0)
    assert torch.equal(warmup.penalty_weights.sort().values, reference.fisher_callback.penalty_weights.sort().values)
    torch.testing.assert_close(
        warmup.penalty(), brute_force_penalty(find_adapted_matrices(model), weights), rtol=1e-5, atol=0
    )
    saved = json.loads((tmp_path / IMPORTANCE_FILE).read_text())
    assert saved["shuffle_seed"] == 7
    rows = list(saved["modules"].values())
    assert [row["importance"] for row in rows] == pytest.approx(measured[permutation].tolist())
    assert [row["fisher"] for row in rows] == pytest.approx(fisher.tolist())


def test_the_controls_are_part_of_the_run_identity(tmp_path):
    trainer, _ = train(tmp_path, fw_shuffle_seed=3, fw_power=0.0)
    run = trainer.identity()["run"]
    assert run["fw_shuffle_seed"] == 3 and run["fw_power"] == 0.0


@pytest.mark.parametrize("seed", [-1, 1.5])
def test_a_shuffle_seed_is_a_non_negative_integer(seed):
    with pytest.raises(ValueError, match="`fw_shuffle_seed` should be an integer in"):
        FWLoraArguments(fw_shuffle_seed=seed)
