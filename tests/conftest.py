"""Tiny models and data built in code: no network, seconds per test.

Tests marked `gpu` run on CUDA and are skipped where there is none, unless `FW_REQUIRE_GPU=1` (set by
`make gpu-check`), which turns such a skip into a failure so that a GPU check cannot pass without a GPU.
"""

import importlib.util
import os
import types
from pathlib import Path

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import RobertaConfig, RobertaForSequenceClassification, TrainingArguments

from fw_trainer import FWLoraArguments, FWLoraTrainer, build_peft_model


# The six roles of a BERT/RoBERTa layer, spelled out here rather than taken from fw_trainer, so that tests check the
# library's default target resolution against an independent list.
ROLES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
# Parametrize a test over these to run it on the CPU everywhere and on CUDA where there is one.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
SEQ_LEN = 12
VOCAB = 50
PAD_ID = 1
# The config of every tiny BERT-style encoder (BERT, RoBERTa, ELECTRA, DeBERTa-v2 ...). Dropout 0 everywhere
# (classifier dropouts fall back to the hidden dropout), so that an autograd reference is deterministic.
TINY_ENCODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=SEQ_LEN + 4,  # RoBERTa's positions start at pad_token_id + 1
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=2,
    pad_token_id=PAD_ID,
)


def tiny_roberta(seed: int = 0, num_labels: int = 2, num_hidden_layers: int = 2) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    config = RobertaConfig(**dict(TINY_ENCODER, num_hidden_layers=num_hidden_layers, num_labels=num_labels))
    return RobertaForSequenceClassification(config)


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences of fixed length, right-padded to random lengths (so padding rows are exercised)."""

    def __init__(self, size: int = 64, seed: int = 0, num_labels: int = 2):
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(3, VOCAB, (size, SEQ_LEN), generator=generator)
        lengths = torch.randint(4, SEQ_LEN + 1, (size,), generator=generator)
        self.attention_mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
        self.input_ids[self.attention_mask == 0] = PAD_ID
        # Labels that depend on the tokens, so there is something to learn.
        self.labels = (self.input_ids[:, 0] % num_labels).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def rows(dataset, start, stop):
    """Rows `start:stop` of a dataset of `input_ids`, `attention_mask` and `labels` tensors, as one batch."""
    return {key: getattr(dataset, key)[start:stop] for key in ("input_ids", "attention_mask", "labels")}


def lora_model(method: str = "fw_lora", seed: int = 0, **fw_kwargs):
    fw_args = FWLoraArguments(method=method, **fw_kwargs)
    model, summary = build_peft_model(tiny_roberta(seed), fw_args)
    return model, fw_args


def lora_weights(model) -> dict[str, torch.Tensor]:
    """A copy of every LoRA factor of `model`, by parameter name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def training_args(output_dir, device: str = "cpu", **kwargs) -> TrainingArguments:
    """Small-run arguments; `device="cuda"` trains on the GPU (the default, `"cpu"`, also on a machine that has
    one)."""
    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        max_steps=6,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


class SequentialFWLoraTrainer(FWLoraTrainer):
    """Batches in dataset order, so a test knows which rows every micro-batch holds."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


@pytest.fixture
def dataset():
    return TokenDataset()


@pytest.fixture(autouse=True)
def no_estimator_left_measuring():
    """A test must not leave the compiler's stance forced (e.g. to `force_eager`): the next test's `torch.compile`
    would silently compile nothing."""
    yield
    stance = torch._dynamo.eval_frame._stance.stance
    if stance != "default":
        torch.compiler.set_stance("default")
        pytest.fail(f"The test left the compiler stance at {stance!r}.")


def load_script(path) -> types.ModuleType:
    """A script of the repository (an example, a benchmark) imported as a module, without running its `main`."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        if os.environ.get("FW_REQUIRE_GPU") == "1":
            pytest.fail("FW_REQUIRE_GPU=1 but CUDA is not available: this GPU test cannot run here.")
        pytest.skip("needs a CUDA GPU")
