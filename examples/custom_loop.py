# FW-LoRA in a plain `accelerate` training loop, without `Trainer` (tests/test_custom_loop.py checks it against
# FWLoraTrainer). Run: `python examples/custom_loop.py [MODEL]`, MODEL a Hub name or a local path (roberta-base).
import sys
from itertools import islice

import torch
from accelerate import Accelerator
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fw_trainer import FisherEstimator, FisherWeightedPenalty, FWLoraArguments, build_peft_model, normalize_importances


def train_fw_lora(model, dataloader, num_epochs=3, learning_rate=2e-4, warmup_steps=100, fw_lambda=1e-4):
    """Trains the peft LoRA `model`: `warmup_steps` plain LoRA steps that measure the Fisher proxy F, then the
    penalty `fw_lambda Σ_m (1 − I_m) ‖ΔW_m‖²` in every step. Returns the importances I by module name."""
    accelerator = Accelerator()
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    batches = (batch for _ in range(num_epochs) for batch in dataloader)
    model.train()

    # 1. Warm-up. F_m of every frozen weight W_m that carries a LoRA adapter, kept on the adapters' device.
    estimator = FisherEstimator(model)
    estimator.start()  # hooks on the adapted layers: ‖∇W_m L‖² = ‖Gᵀ X‖², W_m itself never gets a gradient
    for batch in islice(batches, warmup_steps):
        loss = model(**batch).loss
        # The same loss; its backward tells the hooks how much it gets scaled (an fp16 loss scale, 1 / accumulation).
        accelerator.backward(estimator.loss_to_backpropagate(loss))
        estimator.fold_micro_batch()  # after every backward: this micro-batch's statistic into the step's sum
        optimizer.step()
        optimizer.zero_grad()
        estimator.end_step()  # once per optimizer step: F ← α F + (1 − α) g, all-reduced across processes
    estimator.stop()  # removes the hooks: no cost from here on

    # 2. The freeze: I = F / Σ F (F bias-corrected), and the penalty Σ_m (1 − I_m) ‖s_m B_m A_m‖² without forming B A.
    importances = normalize_importances(estimator.fisher)
    penalty = FisherWeightedPenalty(estimator.matrices, 1 - importances, fw_lambda=fw_lambda)

    # 3. FW-LoRA: the remaining steps with the penalty. `penalty.backward()` adds λ ∇R to the LoRA gradients from the
    # analytic gradient, a few kernels per distinct shape (`loss + fw_lambda * penalty()` would give the same gradient
    # through autograd, with one more kernel per LoRA tensor). Call it after the backward pass, before any clipping.
    for batch in batches:
        accelerator.backward(model(**batch).loss)
        penalty.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {matrix.name: importance for matrix, importance in zip(estimator.matrices, importances.tolist())}


def main(model_name: str = "roberta-base") -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=2)
    # LoRA of rank 8 on the six encoder roles of every layer, as `run_glue_fw.py --method fw_lora --lora_r 8`.
    model, _ = build_peft_model(model, FWLoraArguments(method="fw_lora", lora_r=8))
    reviews = {"a gripping, beautifully acted film": 1, "dull, and far too long": 0, "an instant classic": 1}
    encoded = tokenizer(list(reviews) * 16, padding=True, return_tensors="pt")
    rows = [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], list(reviews.values()) * 16)
    ]
    dataloader = torch.utils.data.DataLoader(rows, batch_size=8, shuffle=True)
    importances = train_fw_lora(model, dataloader, num_epochs=3, learning_rate=1e-3, warmup_steps=6, fw_lambda=1e-2)
    for name, importance in sorted(importances.items(), key=lambda item: -item[1])[:5]:
        print(f"{name:<50} I = {importance:.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
