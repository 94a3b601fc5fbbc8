"""
One rank of the DDP test (`tests/test_ddp.py`): trains FW-LoRA under `torchrun` with gloo on CPU and saves what the
test compares. The same `build_trainer` / `results` also produce the single-process reference inside the test.

Usage: `torchrun --nproc_per_node 2 tests/ddp_worker.py OUTPUT_DIR`; writes `OUTPUT_DIR/rank{RANK}.pt`.
"""

import os
import sys
from typing import Optional

import torch

# Run as a script, this file's folder (tests/) is on `sys.path`; imported by the test, pytest put it there.
from conftest import TokenDataset, lora_model, training_args

from fw_trainer import FWLoraTrainer


BATCH_SIZE = 4
WARMUP_STEPS = 3
# One step past the warm-up, so the first penalised step (identical on every rank) is part of the weight check.
MAX_STEPS = WARMUP_STEPS + 1
DATASET_SIZE = 64


class SequentialFWLoraTrainer(FWLoraTrainer):
    """Reads the data in order (accelerate then deals the 4-row batches out round-robin) and records every
    training micro-batch it sees, so the test can check which rows went where."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_input_ids: list[torch.Tensor] = []

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen_input_ids.append(inputs["input_ids"].detach().cpu().clone())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def build_trainer(
    output_dir: str, gradient_accumulation_steps: int, ddp_backend: Optional[str] = None
) -> SequentialFWLoraTrainer:
    # Same seed in every process: identical base weights and LoRA initialisation everywhere.
    model, fw_args = lora_model("fw_lora", seed=0, fw_warmup_steps=WARMUP_STEPS, fw_lambda=0.1)
    args = training_args(
        output_dir,
        per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_steps=MAX_STEPS,
        learning_rate=1e-2,
        # Only under torchrun: an explicit backend makes accelerate set up a process group even in one process.
        ddp_backend=ddp_backend,
        logging_steps=MAX_STEPS,
    )
    return SequentialFWLoraTrainer(model=model, args=args, train_dataset=TokenDataset(DATASET_SIZE), fw_args=fw_args)


def results(trainer: SequentialFWLoraTrainer) -> dict:
    """What the test compares: the frozen Fisher estimate, the importances, the trained LoRA weights, the data seen."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    callback = trainer.fisher_callback
    return {
        "fisher": callback.fisher.detach().cpu().clone(),
        "importances": callback.importances.detach().cpu().clone(),
        "frozen_at_step": callback.frozen_at_step,
        "lora_weights": {
            name: param.detach().cpu().clone()
            for name, param in model.named_parameters()
            if param.requires_grad and "lora_" in name
        },
        "seen_input_ids": trainer.seen_input_ids,
        "logs": [log for log in trainer.state.log_history if "task_loss" in log],
    }


def main(output_dir: str) -> None:
    rank = int(os.environ["RANK"])
    trainer = build_trainer(output_dir, gradient_accumulation_steps=1, ddp_backend="gloo")
    assert trainer.args.world_size == 2, f"expected 2 processes, got world_size {trainer.args.world_size}"
    trainer.train()
    torch.save(results(trainer), os.path.join(output_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
