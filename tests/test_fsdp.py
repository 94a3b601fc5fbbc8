"""FW-LoRA over a model sharded with torch's FSDP2 (`fully_shard`, 2 processes, gloo, CPU): the importances and the
trained adapter equal DDP's with the same global batch (one process over both ranks' batches), the penalty's gradient
reaches the sharded factors through the loss, and its analytic `.grad` path refuses sharded parameters rather than
drop the gradient. Through the Trainer FSDP is refused: accelerate enables FSDP on accelerators only, so it cannot be
tested here."""

import os

import pytest
import torch
from fsdp_worker import single_process_reference
from test_ddp import run_torchrun

from fw_trainer import FWLoraArguments, FWLoraTrainer


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp_worker.py")


def test_fsdp2_gives_the_importances_and_adapter_of_ddp(tmp_path):
    run_torchrun(tmp_path, WORKER)
    sharded = torch.load(tmp_path / "fsdp.pt")
    reference = single_process_reference()
    torch.testing.assert_close(sharded["fisher"], reference["fisher"], rtol=1e-5, atol=0)
    torch.testing.assert_close(sharded["importances"], reference["importances"], rtol=1e-5, atol=0)
    assert sharded["lora_weights"].keys() == reference["lora_weights"].keys()
    for name, weight in reference["lora_weights"].items():
        torch.testing.assert_close(sharded["lora_weights"][name], weight, rtol=1e-4, atol=1e-6, msg=name)
    assert sharded["analytic_refused"] and not reference["analytic_refused"]
    # The penalty did reach the update: without it the adapter ends elsewhere.
    unpenalised = single_process_reference(fw_lambda=0.0)["lora_weights"]
    assert any(
        not torch.allclose(unpenalised[n], w, rtol=1e-3, atol=1e-5) for n, w in reference["lora_weights"].items()
    )


def test_the_trainer_refuses_fsdp(tmp_path):
    """`FWLoraTrainer` adds the penalty's gradient into `.grad`: under an engine that shards the gradients it refuses
    to start. accelerate enables FSDP only on accelerators, so the engine is marked enabled here by hand, and the
    check runs on the model a `model_init` builds in `train()`."""
    from conftest import lora_model, training_args

    trainer = FWLoraTrainer(model=lora_model("fw_lora")[0], args=training_args(tmp_path), fw_args=FWLoraArguments())
    trainer.is_fsdp_enabled = True
    trainer.model_init = lambda trial=None: lora_model("fw_lora")[0]
    with pytest.raises(ValueError, match="not tested under FSDP"):
        trainer.train()
