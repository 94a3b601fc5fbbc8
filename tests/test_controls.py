"""The studies' controls of FW-LoRA's idea: the same penalty with uniform weights (`fw_power=0`), with the frozen
importances assigned to the wrong matrices (`fw_shuffle_seed`), and with only the top-F matrices left unpenalised
(`fw_exempt_top`), against hand computations of the weights."""

import json

import pytest
import torch
from conftest import SequentialFWLoraTrainer, TokenDataset, lora_model, training_args
from references import brute_force_penalty

from fw_trainer import FWLoraArguments, find_adapted_matrices
from fw_trainer.errors import UsageError
from fw_trainer.importance import exempt_largest
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


@pytest.mark.parametrize(("normalization", "power", "count"), [("max", 0.0, 1), ("sum", 0.0, 2), ("sum", 1.0, 1)])
def test_the_top_exempt_control_leaves_only_the_largest_measured_F_unpenalised(tmp_path, normalization, power, count):
    trainer, model = train(tmp_path, fw_exempt_top=count, fw_power=power, fw_normalization=normalization)
    reference, _ = train(tmp_path / "reference", fw_normalization=normalization)
    warmup = trainer.fisher_callback
    # The same measurement and importances as a plain run; by hand: the matrices sorted by F, the first `count` of
    # them weight 0, every other one its (1 - I)^power.
    torch.testing.assert_close(warmup.fisher, reference.fisher_callback.fisher, rtol=0, atol=0)
    fisher = warmup.fisher.tolist()
    largest = sorted(range(12), key=lambda index: -fisher[index])[:count]
    measured = [value / (sum(fisher) if normalization == "sum" else max(fisher)) for value in fisher]
    weights = torch.tensor([0.0 if index in largest else (1 - measured[index]) ** power for index in range(12)])
    torch.testing.assert_close(warmup.importances, torch.tensor(measured), rtol=1e-6, atol=0)
    torch.testing.assert_close(warmup.penalty_weights, weights, rtol=1e-6, atol=0)
    assert (warmup.penalty_weights == 0).sum() == count  # the measured F of a random model has no ties
    torch.testing.assert_close(
        warmup.penalty(), brute_force_penalty(find_adapted_matrices(model), weights), rtol=1e-5, atol=0
    )
    saved = json.loads((tmp_path / IMPORTANCE_FILE).read_text())
    assert saved["exempt_top"] == count
    assert [row["penalty_weight"] for row in saved["modules"].values()] == pytest.approx(weights.tolist())


def test_top_exempt_breaks_ties_by_model_order():
    weights = torch.full((5,), 0.5)
    fisher = torch.tensor([1.0, 3.0, 2.0, 3.0, 0.0])
    assert exempt_largest(weights, fisher, 1).tolist() == [0.5, 0.0, 0.5, 0.5, 0.5]
    assert exempt_largest(weights, fisher, 2).tolist() == [0.5, 0.0, 0.5, 0.0, 0.5]
    assert exempt_largest(weights, fisher, 0) is weights


def test_the_controls_are_part_of_the_run_identity(tmp_path):
    trainer, _ = train(tmp_path, fw_shuffle_seed=3, fw_power=0.0)
    run = trainer.identity()["run"]
    assert run["fw_shuffle_seed"] == 3 and run["fw_power"] == 0.0 and run["fw_exempt_top"] == 0
    trainer, _ = train(tmp_path / "exempt", fw_exempt_top=1, fw_power=0.0)
    assert trainer.identity()["run"]["fw_exempt_top"] == 1


def test_exempting_every_matrix_is_refused_before_training(tmp_path):
    model, fw_args = lora_model(fw_exempt_top=12)
    with pytest.raises(UsageError, match="--fw_exempt_top 12 would leave every one of the model's 12 adapted"):
        SequentialFWLoraTrainer(
            model=model, args=training_args(tmp_path, max_steps=3), train_dataset=TokenDataset(), fw_args=fw_args
        )


def test_top_exempt_and_shuffle_are_not_combined():
    with pytest.raises(ValueError, match="`fw_exempt_top` and `fw_shuffle_seed` are two controls"):
        FWLoraArguments(fw_exempt_top=1, fw_shuffle_seed=0)


@pytest.mark.parametrize("count", [-1, 0.5])
def test_an_exempt_count_is_a_non_negative_integer(count):
    with pytest.raises(ValueError, match="`fw_exempt_top` should be a non-negative integer"):
        FWLoraArguments(fw_exempt_top=count)


@pytest.mark.parametrize("seed", [-1, 1.5])
def test_a_shuffle_seed_is_a_non_negative_integer(seed):
    with pytest.raises(ValueError, match="`fw_shuffle_seed` should be an integer in"):
        FWLoraArguments(fw_shuffle_seed=seed)
