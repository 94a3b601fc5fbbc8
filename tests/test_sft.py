"""FW-LoRA through trl's `SFTTrainer`: λ = 0 trains exactly as `SFTTrainer` under gradient accumulation, and the SFT
example runs as its docstring says (exit 0, `fw_importance.json` and an adapter that peft reloads)."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script, lora_weights
from peft import PeftModel


trl = pytest.importorskip("trl")

from fw_trainer import FWLoraArguments, build_peft_model  # noqa: E402
from fw_trainer.forgetting import language_modelling_loss  # noqa: E402
from fw_trainer.sft import FWLoraSFTTrainer  # noqa: E402


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sft_fw_lora.py"


def test_lambda_zero_trains_exactly_as_sft_trainer_under_accumulation(tmp_path):
    example = load_script(EXAMPLE)
    example.write_instruction_set(tmp_path / "rows.jsonl", size=48)
    rows = example.read_rows(tmp_path / "rows.jsonl")
    tokenizer = example.word_level_tokenizer(rows)
    fw_args = FWLoraArguments(method="fw_lora", lora_r=4, fw_warmup_steps=2, fw_lambda=0.0)
    model, _ = build_peft_model(example.tiny_llama(tokenizer, seed=0), fw_args)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at initialisation: a non-zero B lets the first steps reach A too
            torch.nn.init.normal_(p, std=0.02)

    def train(trainer_class, output_dir, **kwargs):
        config = trl.SFTConfig(
            output_dir=str(output_dir),
            max_steps=4,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=0,
            completion_only_loss=True,
            max_length=32,
            disable_tqdm=True,
        )
        trainer = trainer_class(
            model=copy.deepcopy(model),
            args=config,
            train_dataset=trl_dataset(rows),
            processing_class=tokenizer,
            **kwargs,
        )
        trainer.train()
        return trainer

    plain = train(trl.SFTTrainer, tmp_path / "plain")
    fw = train(FWLoraSFTTrainer, tmp_path / "fw", fw_args=fw_args)
    assert fw.fisher_callback.frozen and fw.fisher_callback.frozen_at_step == 2
    expected, actual = lora_weights(plain.model), lora_weights(fw.model)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    # SFTTrainer's own metrics and FW-LoRA's reach the same logs.
    logs = [log for log in fw.state.log_history if "loss" in log]
    assert all("mean_token_accuracy" in log and "task_loss" in log for log in logs)


def trl_dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


def test_the_example_runs_and_leaves_importances_and_a_reloadable_adapter(tmp_path):
    output_dir = tmp_path / "sft"
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--output_dir", str(output_dir)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((output_dir / "run_environment.json").read_text())["adapter_file_bytes"] > 0
    importance = json.loads((output_dir / "fw_importance.json").read_text())
    assert importance["frozen_at_step"] == 40

    example = load_script(EXAMPLE)
    tokenizer = example.word_level_tokenizer(example.read_rows(output_dir / "instructions.jsonl"))
    reloaded = PeftModel.from_pretrained(example.tiny_llama(tokenizer, seed=0), str(output_dir))
    weights = lora_weights(reloaded)
    assert weights and any(name.endswith("lora_B.default.weight") and w.abs().sum() > 0 for name, w in weights.items())
    # The forgetting record is the held-out loss of the pretrained model and of the trained adapter, recomputed here.
    held_out = [row["prompt"] + row["completion"] for row in example.read_rows(output_dir / "instructions.jsonl")[:32]]
    forgetting = json.loads((output_dir / "forgetting.json").read_text())
    before = language_modelling_loss(example.tiny_llama(tokenizer, seed=0), tokenizer, held_out)
    after = language_modelling_loss(reloaded, tokenizer, held_out)
    assert forgetting["held_out_loss_before"] == pytest.approx(before, rel=1e-5)
    assert forgetting["held_out_loss_after"] == pytest.approx(after, rel=1e-5) and after < before
