"""AdaLoRA through `FWLoraTrainer`: allocator calls per optimizer step and the shrinking rank budget."""

import json
from unittest import mock

import pytest
import torch
from conftest import SequentialFWLoraTrainer, TokenDataset, lora_model, training_args
from peft.tuners.adalora import AdaLoraModel
from transformers import Trainer

from fw_trainer import FWLoraTrainer
from fw_trainer.state_files import RANK_PATTERN_FILE


def adalora_trainer(output_dir, max_steps=10, **kwargs):
    model, fw_args = lora_model(method="adalora", lora_r=2, adalora_tinit=0.2, adalora_tfinal=0.3, adalora_delta_t=1)
    trainer = FWLoraTrainer(
        model=model,
        args=training_args(output_dir, max_steps=max_steps, **kwargs),
        train_dataset=TokenDataset(size=128),
        fw_args=fw_args,
    )
    return trainer, model


@pytest.mark.parametrize("accumulation", [1, 2])
def test_update_and_allocate_once_per_optimizer_step(tmp_path, accumulation):
    trainer, model = adalora_trainer(tmp_path, gradient_accumulation_steps=accumulation)
    with mock.patch.object(
        AdaLoraModel, "update_and_allocate", autospec=True, side_effect=AdaLoraModel.update_and_allocate
    ) as spy:
        trainer.train()
    assert [call.args[1] for call in spy.call_args_list] == list(range(10))
    assert all(call.args[0] is model.base_model for call in spy.call_args_list)


def test_total_step_comes_from_the_trainer(tmp_path):
    trainer, model = adalora_trainer(tmp_path, max_steps=20)
    trainer.train()
    config = model.peft_config["default"]
    assert (config.total_step, config.tinit, config.tfinal) == (20, 4, 6)


def test_budget_shrinks_from_init_r_to_target_r(tmp_path):
    trainer, model = adalora_trainer(tmp_path)
    trainer.train()

    num_matrices = 12
    budgets = [log["adalora_total_rank"] for log in trainer.state.log_history if "adalora_total_rank" in log]
    assert budgets[0] == 3 * num_matrices  # init_r = ceil(1.5 * 2)
    assert budgets[-1] == 2 * num_matrices
    assert budgets == sorted(budgets, reverse=True)
    mean_ranks = [log["adalora_mean_rank"] for log in trainer.state.log_history if "adalora_mean_rank" in log]
    assert mean_ranks[-1] == 2.0

    # The masks really are applied: 24 singular values survive, the rest are zero.
    surviving = sum(int((p != 0).sum()) for name, p in model.named_parameters() if "lora_E" in name)
    assert surviving == 2 * num_matrices
    with open(tmp_path / RANK_PATTERN_FILE) as f:
        saved = json.load(f)
    assert saved["total_rank"] == 2 * num_matrices
    assert len(saved["ranks"]) == num_matrices
    assert model.peft_config["default"].rank_pattern is not None


def test_schedule_that_does_not_fit_is_rejected(tmp_path):
    model, fw_args = lora_model(method="adalora", adalora_tinit=3, adalora_tfinal=3)
    trainer = FWLoraTrainer(
        model=model, args=training_args(tmp_path, max_steps=5), train_dataset=TokenDataset(), fw_args=fw_args
    )
    with pytest.raises(ValueError, match="schedule does not fit in 5 optimizer steps"):
        trainer.train()


def cross_entropy_of_logits(model, dataset, rows) -> float:
    """The task loss computed independently: the model's logits (peft's forward; its regulariser touches only the loss)
    and torch's cross-entropy."""
    batch = {key: torch.stack([dataset[i][key] for i in rows]) for key in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits, batch["labels"]).item()


def test_reported_losses_are_the_task_loss_alone(tmp_path):
    """`eval_loss` and the logged `task_loss` are the cross-entropy of AdaLoRA's logits, as for every other method;
    peft's regulariser is logged apart. Failed before: peft's forward added `0.5 × R` to both (2.4 against 0.7)."""
    dataset = TokenDataset(size=16)
    model, fw_args = lora_model(method="adalora", lora_r=2, adalora_tinit=0.5, adalora_tfinal=0.2)
    trainer = SequentialFWLoraTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=1, learning_rate=0.0, per_device_eval_batch_size=16),
        train_dataset=dataset,
        eval_dataset=dataset,
        fw_args=fw_args,
    )
    expected_train = cross_entropy_of_logits(model, dataset, range(8))
    trainer.train()
    log = next(log for log in trainer.state.log_history if "task_loss" in log)
    assert log["task_loss"] == pytest.approx(expected_train, rel=1e-5)
    assert log["adalora_orth_penalty"] > 0
    # The training loss is the task loss plus the weighted regulariser, which trains the model (below).
    assert log["loss"] == pytest.approx(expected_train + 0.5 * log["adalora_orth_penalty"], rel=1e-5)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(
        cross_entropy_of_logits(model, dataset, range(16)), rel=1e-5
    )
    # peft's own forward still adds its regulariser outside the trainer.
    batch = {
        key: torch.stack([dataset[i][key] for i in range(16)]) for key in ("input_ids", "attention_mask", "labels")
    }
    with torch.no_grad():
        peft_loss = model(**batch).loss.item()
        penalty = trainer.adalora_callback.orthogonality_penalty(model).item()
    assert peft_loss == pytest.approx(cross_entropy_of_logits(model, dataset, range(16)) + 0.5 * penalty, rel=1e-5)


def test_training_follows_pefts_loss(tmp_path):
    """The regulariser the trainer adds gives the gradient of peft's own loss: one step of FW-LoRA's trainer and of a
    plain `Trainer` (peft's forward, regulariser included) end with the same weights."""
    dataset = TokenDataset(size=8)
    results = {}
    for name, trainer_class in (("fw", SequentialFWLoraTrainer), ("plain", Trainer)):
        model, fw_args = lora_model(method="adalora", lora_r=2, adalora_tinit=0.5, adalora_tfinal=0.2)
        extra = {"fw_args": fw_args} if trainer_class is not Trainer else {}
        trainer_class(
            model=model, args=training_args(tmp_path / name, max_steps=1), train_dataset=dataset, **extra
        ).train()
        results[name] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, value in results["fw"].items():
        torch.testing.assert_close(value, results["plain"][name], rtol=1e-5, atol=1e-7, msg=name)
