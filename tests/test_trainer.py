"""`FWLoraTrainer` end to end: against a plain `Trainer`, through TensorBoard, and across a resume."""

import glob
import json
import os

import pytest
import torch
from conftest import DEVICES, TokenDataset, lora_model, training_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import Trainer

from fw_trainer import FWLoraArguments, FWLoraTrainer, find_adapted_matrices
from fw_trainer.state_files import IMPORTANCE_FILE


def losses(trainer):
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_zero_lambda_reproduces_a_plain_trainer_run(tmp_path, device, bf16):
    dataset = TokenDataset()
    plain_model, _ = lora_model(method="lora")
    plain_args = training_args(tmp_path / "plain", device, max_steps=6, bf16=bf16)
    plain = Trainer(model=plain_model, args=plain_args, train_dataset=dataset)
    plain.train()

    model, fw_args = lora_model(fw_warmup_steps=2, fw_lambda=0.0)
    trainer = FWLoraTrainer(
        model=model,
        args=training_args(tmp_path / "fw", device, max_steps=6, bf16=bf16),
        train_dataset=dataset,
        fw_args=fw_args,
    )
    trainer.train()

    assert trainer.fisher_callback.frozen  # the warm-up ran, with its hooks, and changed nothing
    assert losses(trainer) == losses(plain)
    for (name, param), plain_param in zip(model.named_parameters(), plain_model.parameters()):
        assert torch.equal(param, plain_param), name


def test_penalty_shrinks_the_adapters(tmp_path):
    """With a large λ the penalised run ends with smaller ‖ΔW‖ than plain LoRA, the most on unimportant matrices."""
    dataset = TokenDataset()
    norms = {}
    for method in ("lora", "fw_lora"):
        model, fw_args = lora_model(method=method, fw_warmup_steps=2, fw_lambda=1.0, fw_normalization="max")
        trainer = FWLoraTrainer(
            model=model, args=training_args(tmp_path / method, max_steps=12), train_dataset=dataset, fw_args=fw_args
        )
        trainer.train()
        norms[method] = torch.stack(
            [m.layer.get_delta_weight("default").norm() for m in find_adapted_matrices(model)]
        ).detach()
    assert (norms["fw_lora"] < norms["lora"]).all()
    assert all("fw_penalty" in log for log in trainer.state.log_history if "loss" in log and log["step"] > 2)


def test_metrics_reach_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    model, fw_args = lora_model(fw_warmup_steps=2)
    trainer = FWLoraTrainer(
        model=model,
        args=training_args(tmp_path / "out", max_steps=5, report_to="tensorboard"),
        train_dataset=TokenDataset(),
        fw_args=fw_args,
    )
    trainer.train()

    event_files = glob.glob(str(tmp_path / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    assert event_files
    accumulator = EventAccumulator(os.path.dirname(event_files[0]))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    task_loss = [event.value for event in accumulator.Scalars("train/task_loss")]
    assert len(task_loss) == 5
    logged = [log["task_loss"] for log in trainer.state.log_history if "task_loss" in log]
    torch.testing.assert_close(torch.tensor(task_loss), torch.tensor(logged))
    assert [event.step for event in accumulator.Scalars("train/fw_penalty")] == [3, 4, 5]
    importance_tags = [tag for tag in tags if tag.startswith("train/fw_importance/")]
    assert len(importance_tags) == 12
    query = accumulator.Scalars("train/fw_importance/roberta.encoder.layer.0.attention.self.query")
    assert query[0].step == 2
    assert query[0].value == pytest.approx(trainer.fisher_callback.importances[0].item(), rel=1e-6)


def _train_with_checkpoints(output_dir, resume_from=None):
    model, fw_args = lora_model(fw_warmup_steps=4, fw_lambda=1e-1)
    trainer = FWLoraTrainer(
        model=model,
        args=training_args(output_dir, max_steps=8, save_strategy="steps", save_steps=2),
        train_dataset=TokenDataset(),
        fw_args=fw_args,
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, model


@pytest.mark.parametrize("checkpoint_step", [2, 6], ids=["mid-warmup", "after-warmup"])
def test_resume_gives_the_straight_run(tmp_path, checkpoint_step):
    straight, straight_model = _train_with_checkpoints(tmp_path / "straight")
    checkpoint = tmp_path / "straight" / f"checkpoint-{checkpoint_step}"
    with open(checkpoint / IMPORTANCE_FILE) as f:
        saved = json.load(f)
    assert saved["frozen"] == (checkpoint_step >= 4)
    assert saved["num_updates"] == min(checkpoint_step, 4)

    resumed, resumed_model = _train_with_checkpoints(tmp_path / "resumed", resume_from=str(checkpoint))

    assert resumed.fisher_callback.frozen_at_step == 4
    torch.testing.assert_close(resumed.fisher_callback.fisher, straight.fisher_callback.fisher, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        resumed.fisher_callback.importances, straight.fisher_callback.importances, rtol=1e-6, atol=0
    )
    for (name, param), straight_param in zip(resumed_model.named_parameters(), straight_model.parameters()):
        torch.testing.assert_close(param, straight_param, rtol=1e-6, atol=1e-8, msg=name)


def test_resume_true_picks_the_last_checkpoint(tmp_path):
    straight, _ = _train_with_checkpoints(tmp_path / "run")
    # Resuming a finished run from its last checkpoint restores the frozen importances and trains no further.
    resumed, _ = _train_with_checkpoints(tmp_path / "run", resume_from=True)
    assert resumed.state.global_step == 8
    torch.testing.assert_close(resumed.fisher_callback.importances, straight.fisher_callback.importances)


def test_each_model_from_model_init_gets_its_own_warmup(tmp_path):
    """With `model_init` (hyper-parameter search) every `train()` is a new run: a second call must repeat the first."""
    _, fw_args = lora_model(fw_warmup_steps=2, fw_lambda=1.0)
    trainer = FWLoraTrainer(
        model_init=lambda: lora_model(seed=0)[0],
        args=training_args(tmp_path, max_steps=5),
        train_dataset=TokenDataset(),
        fw_args=fw_args,
    )
    trainer.train()
    first_model, first_fisher = trainer.model, trainer.fisher_callback.fisher
    trainer.train()

    assert trainer.model is not first_model
    assert trainer.fisher_callback.matrices[0].layer in list(trainer.model.modules())
    assert trainer.fisher_callback.frozen_at_step == 2
    torch.testing.assert_close(trainer.fisher_callback.fisher, first_fisher, rtol=1e-6, atol=0)
    for param, first_param in zip(trainer.model.parameters(), first_model.parameters()):
        torch.testing.assert_close(param, first_param, rtol=1e-6, atol=1e-8)
    assert not any(matrix.layer._forward_hooks for matrix in find_adapted_matrices(first_model))


def test_a_subclass_overriding_compute_loss_keeps_the_accumulation_fix(tmp_path):
    """RoBERTa ignores `num_items_in_batch`: a subclass whose `compute_loss` only wraps the mixin's still has the
    Trainer divide the loss by the accumulation steps (before the fix it did not: the logged loss came out 2x)."""

    class Logging(FWLoraTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    model, _ = lora_model("lora")
    trainer = Logging(
        model=model, args=training_args(tmp_path, gradient_accumulation_steps=2), fw_args=FWLoraArguments("lora")
    )
    assert trainer.model_accepts_loss_kwargs is False


def test_fw_lora_trainer_class_composes_with_seq2seq_trainer(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from fw_trainer import fw_lora_trainer_class

    trainer_class = fw_lora_trainer_class(Seq2SeqTrainer)
    assert issubclass(trainer_class, Seq2SeqTrainer) and fw_lora_trainer_class(trainer_class) is trainer_class
    model, fw_args = lora_model("fw_lora", fw_warmup_steps=2)
    args = Seq2SeqTrainingArguments(
        str(tmp_path), max_steps=3, per_device_train_batch_size=8, report_to="none", use_cpu=True, save_strategy="no"
    )
    trainer = trainer_class(model=model, args=args, train_dataset=TokenDataset(32), fw_args=fw_args)
    trainer.train()
    assert trainer.fisher_callback.frozen_at_step == 2
