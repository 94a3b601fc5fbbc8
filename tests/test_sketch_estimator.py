"""The sketched Fisher estimator (`fw_estimator="sketch"`) against the exact one and autograd."""

import pytest
import torch
from conftest import SequentialFWLoraTrainer, TokenDataset, lora_model, rows, training_args
from references import reference_sq_grad_norms
from scipy.stats import spearmanr

from fw_trainer import FisherEstimator


def sketched_steps(model, batch, num_steps: int, probes: int) -> torch.Tensor:
    """The running mean of `num_steps` independent sketches of the same micro-batch."""
    estimator = FisherEstimator(model, estimator="sketch", sketch_probes=probes, average="mean")
    estimator.start()
    model.train()
    for _ in range(num_steps):
        estimator.loss_to_backpropagate(model(**batch).loss).backward()
        estimator.fold_micro_batch()
        estimator.end_step()
    estimator.stop()
    model.zero_grad(set_to_none=True)
    return estimator._running


@pytest.mark.parametrize(
    "num_steps, probes, rtol",
    [
        (1, 4096, 0.1),  # many probes: relative standard deviation sqrt(2 / k) ≈ 2 %
        (200, 8, 0.15),  # few probes are unbiased: each off by ~50 %, the mean of 200 by ~3.5 %
    ],
)
def test_sketch_converges_to_the_exact_value(num_steps, probes, rtol):
    dataset = TokenDataset(size=8)
    model, _ = lora_model()
    expected = reference_sq_grad_norms(model, rows(dataset, 0, 8))
    estimate = sketched_steps(model, rows(dataset, 0, 8), num_steps=num_steps, probes=probes)
    torch.testing.assert_close(estimate, expected, rtol=rtol, atol=0)


def test_probes_leave_the_global_random_stream_alone():
    dataset = TokenDataset(size=8)
    model, _ = lora_model()
    before = torch.get_rng_state()
    sketched_steps(model, rows(dataset, 0, 8), num_steps=2, probes=8)
    assert torch.equal(torch.get_rng_state(), before)


def test_sketched_importances_rank_like_the_exact_ones(tmp_path):
    """Over a 32-step warm-up (the same trajectory for both: the estimate does not touch training), with 16 probes."""
    dataset = TokenDataset(size=256)
    importances = {}
    for estimator in ("exact", "sketch"):
        model, fw_args = lora_model(fw_warmup_steps=32, fw_estimator=estimator, fw_sketch_probes=16)
        trainer = SequentialFWLoraTrainer(
            model=model, args=training_args(tmp_path / estimator, max_steps=32), train_dataset=dataset, fw_args=fw_args
        )
        trainer.train()
        importances[estimator] = trainer.fisher_callback.importances
    correlation = spearmanr(importances["exact"].numpy(), importances["sketch"].numpy()).statistic
    assert correlation >= 0.9, correlation


def test_one_sketch_reproduced_by_hand():
    """`‖(X Z)ᵀ G‖² / k` per matrix, with X and G from plain autograd and Z drawn as documented: once per micro-batch
    and input width (32, then 48 for the FFN output), from a generator seeded with the training seed."""
    dataset = TokenDataset(size=8)
    model, _ = lora_model()
    batch = rows(dataset, 0, 8)
    estimator = FisherEstimator(model, estimator="sketch", sketch_probes=4, average="mean", seed=123)
    estimator.start()
    model.train()
    loss = model(**batch).loss
    assert sorted(estimator._sketch_probes) == [32, 48]  # probes of two widths for 12 matrices
    estimator.loss_to_backpropagate(loss).backward()
    estimator.fold_micro_batch()
    estimator.end_step()
    estimator.stop()
    model.zero_grad(set_to_none=True)

    captured = []

    def keep(module, args, output):
        output.retain_grad()
        captured.append((args[0].detach().reshape(-1, args[0].shape[-1]), output))

    handles = [matrix.layer.register_forward_hook(keep) for matrix in estimator.matrices]
    model(**batch).loss.backward()
    for handle in handles:
        handle.remove()
    generator = torch.Generator().manual_seed(123)
    probes = {32: torch.randn(32, 4, generator=generator), 48: torch.randn(48, 4, generator=generator)}
    expected = torch.stack(
        [
            ((x @ probes[x.shape[1]]).t() @ out.grad.reshape(-1, out.shape[-1])).square().sum() / 4
            for x, out in captured
        ]
    )
    torch.testing.assert_close(estimator._running, expected, rtol=1e-5, atol=0)
