"""AdaLoRA through `FWLoraTrainer`: allocator calls per optimizer step and the shrinking rank budget."""

import json
from unittest import mock

import pytest
from conftest import TokenDataset, lora_model, training_args
from peft.tuners.adalora import AdaLoraModel

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
