"""A tiny BERT with a tokenizer trained in code, saved to disk, and tiny GLUE-layout TSVs (SST-2, RTE, STS-B,
MNLI), as module-scoped fixtures, and the GLUE script's command line for them: the runs of `run_glue_fw.py` that the
tests of the script, its faults and the studies built on it start from."""

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from glue_tsv_samples import MNLI_DEV_HEADER, MNLI_TRAIN_HEADER, mnli_row
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from fw_trainer.glue import run as run_glue_fw


WORDS = "good great fine nice bad awful poor sad the a movie film plot was is very not quite".split()
POSITIVE = {"good", "great", "fine", "nice"}


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved tiny BERT with a WordLevel tokenizer trained here on the task vocabulary."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator([" ".join(WORDS)] * 3, trainers.WordLevelTrainer(special_tokens=special))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=fast.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    return str(path)


def write_tsv(path: Path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        if header:
            writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    """SST-2 (single sentence), RTE (pair, string labels), STS-B (regression), MNLI (matched and mismatched dev) in
    the original GLUE layout."""
    root = tmp_path_factory.mktemp("glue")
    rng = random.Random(0)
    for split, size in (("train", 96), ("dev", 32)):
        sst2 = []
        for _ in range(size):
            text = sentence(rng)
            sst2.append((text, int(any(word in POSITIVE for word in text.split()))))
        write_tsv(root / "SST-2" / f"{split}.tsv", ("sentence", "label"), sst2)
        rte = [(i, sentence(rng), sentence(rng), rng.choice(["entailment", "not_entailment"])) for i in range(size)]
        write_tsv(root / "RTE" / f"{split}.tsv", ("index", "sentence1", "sentence2", "label"), rte)
        stsb = [
            (i, "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", sentence(rng), sentence(rng),
             f"{rng.uniform(0, 5):.3f}")
            for i in range(size)
        ]  # fmt: skip
        header = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
                  "score")  # fmt: skip
        write_tsv(root / "STS-B" / f"{split}.tsv", header, stsb)
    labels = ["entailment", "neutral", "contradiction"]
    mnli = {
        "train.tsv": (MNLI_TRAIN_HEADER, 96, 1),
        "dev_matched.tsv": (MNLI_DEV_HEADER, 16, 5),
        "dev_mismatched.tsv": (MNLI_DEV_HEADER, 24, 5),
    }
    for name, (header, size, votes) in mnli.items():
        rows = [mnli_row(i, sentence(rng), sentence(rng), [rng.choice(labels)] * (votes + 1)) for i in range(size)]
        (root / "MNLI").mkdir(exist_ok=True)
        (root / "MNLI" / name).write_text("".join(line + "\n" for line in [header, *rows]))
    for task, header, make in (
        ("SST-2", ("index", "sentence"), lambda i: (i, sentence(rng))),
        ("RTE", ("index", "sentence1", "sentence2"), lambda i: (i, sentence(rng), sentence(rng))),
    ):
        write_tsv(root / task / "test.tsv", header, [make(i) for i in range(10)])
    return root


def run(args) -> int:
    return run_glue_fw.main([str(a) for a in args])


def common(model_dir, output_dir, *extra):
    return [
        "--model_name_or_path", model_dir, "--output_dir", output_dir, "--do_train", "--do_eval",
        "--per_device_train_batch_size", "16", "--learning_rate", "5e-3", "--max_steps", "12", "--logging_steps", "4",
        "--lora_r", "4", "--fw_warmup_steps", "4", "--use_cpu", "--seed", "0", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_csv(path, rows, columns):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
