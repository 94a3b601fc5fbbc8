"""
One rank of the FSDP2 test (`tests/test_fsdp.py`): FW-LoRA's warm-up and penalty in a plain training loop over a
model sharded with torch's `fully_shard` (gloo, CPU), and the same loop in one process over the two ranks' batches
as micro-batches (what DDP with that global batch computes), which the test compares it with.

Usage: `torchrun --nproc_per_node 2 tests/fsdp_worker.py OUTPUT_DIR`; rank 0 writes `OUTPUT_DIR/fsdp.pt`.
"""

import os
import sys

import torch

# Run as a script, this file's folder (tests/) is on `sys.path`; imported by the test, pytest put it there.
from conftest import TokenDataset, lora_model
from torch.distributed.fsdp import fully_shard

from fw_trainer import FisherEstimator, FisherWeightedPenalty, normalize_importances


NUM_RANKS = 2
BATCH_SIZE = 4  # per rank and micro-batch
WARMUP_STEPS = 2
STEPS = 4
FW_LAMBDA = 0.5


def batch(dataset: TokenDataset, step: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s rows of optimizer step `step`: each step takes NUM_RANKS × BATCH_SIZE rows in order."""
    start = (step * NUM_RANKS + rank) * BATCH_SIZE
    return {
        key: getattr(dataset, key)[start : start + BATCH_SIZE] for key in ("input_ids", "attention_mask", "labels")
    }


def train(model, micro_batches_of_step, loss_scale: float, fw_lambda: float = FW_LAMBDA) -> dict:
    """The custom loop of examples/custom_loop.py, with the penalty added to the loss (autograd carries its gradient
    into sharded parameters): `micro_batches_of_step(t)` gives this process's micro-batches of step `t`."""
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    model.train()
    estimator, penalty = FisherEstimator(model, estimator="exact"), None
    estimator.start()
    for step in range(STEPS):
        if step == WARMUP_STEPS:
            estimator.stop()
            importances = normalize_importances(estimator.fisher)
            penalty = FisherWeightedPenalty(estimator.matrices, 1 - importances)
        for micro_batch in micro_batches_of_step(step):
            loss = model(**micro_batch).loss
            if penalty is None:
                loss = estimator.loss_to_backpropagate(loss)  # the task loss itself, scaled after
            else:
                loss = loss + fw_lambda * penalty()
            (loss * loss_scale).backward()
            if penalty is None:
                estimator.fold_micro_batch()
        optimizer.step()
        optimizer.zero_grad()
        if penalty is None:
            estimator.end_step()
    try:  # the analytic path would write full-size gradients into sharded `.grad`: it must refuse, not drop them
        penalty.backward(fw_lambda)
        analytic_refused = False
    except RuntimeError:
        analytic_refused = True
    optimizer.zero_grad()
    full = {
        name: (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().clone()
        for name, param in model.named_parameters()
        if "lora_" in name
    }
    return {
        "fisher": estimator.fisher.clone(),
        "importances": importances.clone(),
        "lora_weights": full,
        "analytic_refused": analytic_refused,
    }


def single_process_reference(fw_lambda: float = FW_LAMBDA) -> dict:
    """One process, each step's NUM_RANKS batches as micro-batches of mean loss / NUM_RANKS: DDP's gradient."""
    model, _ = lora_model("fw_lora", seed=0)
    dataset = TokenDataset(64)
    micro_batches = lambda step: [batch(dataset, step, rank) for rank in range(NUM_RANKS)]  # noqa: E731
    return train(model, micro_batches, 1.0 / NUM_RANKS, fw_lambda)


def main(output_dir: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    model, _ = lora_model("fw_lora", seed=0)  # the same seed everywhere: identical weights before sharding
    for layer in model.base_model.model.roberta.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    dataset = TokenDataset(64)
    results = train(model, lambda step: [batch(dataset, step, rank)], 1.0)
    if rank == 0:
        torch.save(results, os.path.join(output_dir, "fsdp.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
