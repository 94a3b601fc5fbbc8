"""Every `train()` attempt starts clean: nothing of an attempt that died (an error, or the out-of-memory retry of
`--auto_find_batch_size`) goes into F; and the options that make FW-LoRA plain LoRA are said at the start."""

import pytest
import torch
from conftest import SequentialFWLoraTrainer, TokenDataset, lora_model, training_args
from transformers import TrainerCallback

from fw_trainer.errors import UsageError


K = 4


class DiesOnce(TrainerCallback):
    """Raises `error` at the start of optimizer step `at` (0-based), in the first attempt only."""

    def __init__(self, error: Exception, at: int = 2):
        self.error, self.at, self.fired = error, at, False

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at and not self.fired:
            self.fired = True
            raise self.error


def trainer_for(tmp_path, name, callbacks=(), **args):
    # lr 0: the weights never move, so an aborted attempt leaves the model as it was and a clean run is the reference.
    model, fw_args = lora_model(fw_warmup_steps=K, fw_lambda=0.1, fw_estimator="exact")
    arguments = training_args(tmp_path / name, learning_rate=0.0, max_steps=6, save_strategy="no", **args)
    return SequentialFWLoraTrainer(
        model=model, args=arguments, train_dataset=TokenDataset(), fw_args=fw_args, callbacks=list(callbacks)
    )


def measured(trainer) -> tuple[torch.Tensor, int]:
    warmup = trainer.fisher_callback
    return warmup.fisher, int(warmup.estimator.state_dict()["num_updates"])


def test_train_again_after_a_crash_mid_warmup_measures_from_a_clean_estimate(tmp_path):
    """Failed before: the second attempt kept the aborted steps in F (6 updates for K = 4)."""
    crashing = DiesOnce(RuntimeError("killed"))
    trainer = trainer_for(tmp_path, "crashed", [crashing])
    with pytest.raises(RuntimeError, match="killed"):
        trainer.train()
    trainer.train()
    reference = trainer_for(tmp_path, "clean")
    reference.train()
    fisher, updates = measured(trainer)
    assert updates == K and trainer.fisher_callback.frozen_at_step == K
    torch.testing.assert_close(fisher, measured(reference)[0], rtol=1e-6, atol=0)


def test_the_out_of_memory_retry_of_auto_find_batch_size_measures_from_a_clean_estimate(tmp_path):
    """transformers retries the training loop with a smaller batch (accelerate: 90 %) after an out-of-memory error;
    failed before: F mixed the failed attempt's steps with the retry's."""
    oom = DiesOnce(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    trainer = trainer_for(tmp_path, "retried", [oom], auto_find_batch_size=True)
    output = trainer.train()
    assert oom.fired and trainer.state.train_batch_size == 7  # the retry ran, with int(0.9 × 8)
    reference = trainer_for(tmp_path, "clean", per_device_train_batch_size=7)
    reference.train()
    fisher, updates = measured(trainer)
    assert updates == K
    torch.testing.assert_close(fisher, measured(reference)[0], rtol=1e-6, atol=0)
    assert output.metrics["train_segments"] == 1  # the failed attempt is not a segment of the run


@pytest.mark.parametrize(
    "fw_kwargs, message",
    [
        (dict(fw_warmup_steps=6), "its warm-up of 6 steps covers the whole run of 6 optimizer steps"),
        (dict(fw_warmup_steps=2, fw_lambda=0.0), "`fw_lambda` is 0, so the penalty adds nothing"),
    ],
)
def test_options_that_make_fw_lora_plain_lora_are_said_at_the_start(tmp_path, fw_kwargs, message):
    """Failed before: a warm-up as long as the run, or λ = 0, trained plain LoRA without a word."""
    model, fw_args = lora_model(**fw_kwargs)
    seen_at = []

    class RecordsTheStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen_at.append(len(caught))

    trainer = SequentialFWLoraTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=6, save_strategy="no"),
        train_dataset=TokenDataset(),
        fw_args=fw_args,
        callbacks=[RecordsTheStep()],
    )
    with pytest.warns(UserWarning, match="This FW-LoRA run is plain LoRA") as caught:
        trainer.train()
    plain = [warning for warning in caught if "plain LoRA" in str(warning.message)]
    assert len(plain) == 1 and message in str(plain[0].message)
    assert seen_at[0] >= 1  # said before the first step


def test_training_data_that_gives_no_batch_is_refused_before_training(tmp_path):
    """Failed before: zero optimizer steps, and a run that looked finished (train_loss 0.0, uniform importances)."""
    model, fw_args = lora_model(fw_warmup_steps=2)
    trainer = SequentialFWLoraTrainer(
        model=model,
        args=training_args(tmp_path, per_device_train_batch_size=16, dataloader_drop_last=True, max_steps=-1),
        train_dataset=TokenDataset(size=8),
        fw_args=fw_args,
    )
    with pytest.raises(UsageError, match="gives no batch, so nothing would train: 8 rows, batches of 16"):
        trainer.train()
    assert trainer.state.global_step == 0 and not list(tmp_path.iterdir())
