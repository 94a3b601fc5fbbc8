"""The training loop without `Trainer` (`examples/custom_loop.py`, shown in docs/custom_loop.md) against
`FWLoraTrainer` on the same batches: the same importances and the same trained weights."""

import re
from pathlib import Path

import torch
from conftest import SequentialFWLoraTrainer, TokenDataset, load_script, lora_model, training_args
from torch.utils.data import DataLoader


ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_loop.py"
# The page that shows the example, verbatim, as its one Python block.
PAGE = ROOT / "docs" / "custom_loop.md"


def load_example():
    return load_script(EXAMPLE)


def test_the_docs_show_the_example_verbatim():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.DOTALL)
    assert blocks == [EXAMPLE.read_text()]


def test_custom_loop_trains_like_fw_lora_trainer(tmp_path, monkeypatch):
    # Two epochs of four 8-row batches, K = 3: the warm-up, the freeze and five penalised steps across the epoch end.
    dataset = TokenDataset(size=32)
    options = {"num_epochs": 2, "learning_rate": 1e-2, "warmup_steps": 3, "fw_lambda": 1e-1}
    model, fw_args = lora_model(fw_warmup_steps=options["warmup_steps"], fw_lambda=options["fw_lambda"])
    # The loop's optimizer and schedule: torch's AdamW (not the Trainer's fused default), no decay, a constant
    # learning rate, no clipping.
    args = training_args(
        tmp_path,
        max_steps=-1,
        num_train_epochs=options["num_epochs"],
        learning_rate=options["learning_rate"],
        optim="adamw_torch",
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    trainer = SequentialFWLoraTrainer(model=model, args=args, train_dataset=dataset, fw_args=fw_args)
    trainer.train()
    assert trainer.state.global_step == 8
    penalised = [log["step"] for log in trainer.state.log_history if "fw_penalty" in log]
    assert penalised == [4, 5, 6, 7, 8]

    # The same initial weights (same seed), the same batches in the same order, on the CPU like the trainer.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    loop_model, _ = lora_model(fw_warmup_steps=options["warmup_steps"], fw_lambda=options["fw_lambda"])
    importances = load_example().train_fw_lora(loop_model, DataLoader(dataset, batch_size=8), **options)

    callback = trainer.fisher_callback
    assert list(importances) == [matrix.name for matrix in callback.matrices]
    torch.testing.assert_close(torch.tensor(list(importances.values())), callback.importances, rtol=1e-5, atol=0)
    # lora_B starts at zero: a non-zero one shows that the comparison below is not between untrained models.
    assert all(matrix.lora_B.abs().max() > 0 for matrix in callback.matrices)
    for (name, param), loop_param in zip(model.named_parameters(), loop_model.parameters()):
        assert torch.equal(loop_param, param), name
