"""
FW-LoRA with `FWLoraTrainer` on real SST-2 sentences, with fw-lora's core install only (`pip install fw-lora`: torch,
transformers, peft and accelerate). The GLUE TSVs are read with the csv module, so neither `datasets` nor the GLUE
script's extra is needed:

    GLUE_DIR=/path/to/glue python examples/trainer_fw_lora.py --output_dir outputs/trainer-fw-lora
    python examples/trainer_fw_lora.py --glue_dir /path/to/glue --model_name_or_path FacebookAI/roberta-base \
        --max_train_samples 16000 --max_steps 1000 --fw_warmup_steps 500

It leaves the adapter (`adapter_model.safetensors`) and `fw_importance.json` (F, I and 1 − I per adapted matrix) in
`--output_dir`, and prints the dev accuracy and the importance table. `tests/test_core_install.py` runs it with the
GLUE script's dependencies made unimportable.
"""

import argparse
import csv
import os
import random
from typing import Optional

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    EvalPrediction,
    PreTrainedTokenizerBase,
    TrainingArguments,
)

from fw_trainer import FWLoraArguments, FWLoraTrainer, build_peft_model


class SentenceDataset(torch.utils.data.Dataset):
    """
    Tokenized rows of a GLUE single-sentence TSV file (`sentence` and `label` columns, as SST-2's), unpadded: the
    Trainer's default collator pads each batch to its longest sentence.

    Args:
        path (`str`): The TSV file, e.g. `SST-2/train.tsv`.
        tokenizer (`PreTrainedTokenizerBase`): The model's tokenizer.
        max_samples (`int`, *optional*): Keep this many rows, drawn at random with `seed`; default: every row.
        seed (`int`, *optional*, defaults to 0): The seed of that draw.
        max_length (`int`, *optional*, defaults to 128): Longer sentences are truncated.
    """

    def __init__(
        self,
        path: str,
        tokenizer: PreTrainedTokenizerBase,
        max_samples: Optional[int] = None,
        seed: int = 0,
        max_length: int = 128,
    ) -> None:
        with open(path, newline="", encoding="utf-8") as file:
            # QUOTE_NONE: the GLUE TSVs are not CSV-quoted, and a sentence may start with a quote character.
            rows = list(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
        if max_samples is not None and max_samples < len(rows):
            # A random subset rather than the file's first rows, which need not hold both labels in equal shares.
            rows = random.Random(seed).sample(rows, max_samples)
        encoded = tokenizer([row["sentence"] for row in rows], truncation=True, max_length=max_length)
        self.features = [
            {**{key: values[index] for key, values in encoded.items()}, "labels": int(row["label"])}
            for index, row in enumerate(rows)
        ]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """SST-2's metric, computed here so that no metrics library is needed."""
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def fine_tune(
    model_name_or_path: str,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: torch.utils.data.Dataset,
    eval_dataset: torch.utils.data.Dataset,
    output_dir: str,
    max_steps: int = 1000,
    fw_warmup_steps: int = 500,
    learning_rate: float = 2e-4,
) -> dict[str, float]:
    """
    Fine-tunes `model_name_or_path` on `train_dataset` with FW-LoRA (rank 8, λ = 1e-4, K = `fw_warmup_steps`), saves
    the adapter to `output_dir` and returns the evaluation on `eval_dataset`.
    """
    # [docs-start]
    fw_args = FWLoraArguments(method="fw_lora", lora_r=8, fw_lambda=1e-4, fw_warmup_steps=fw_warmup_steps)
    model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path, num_labels=2)
    model, summary = build_peft_model(model, fw_args)  # LoRA on the six encoder roles of every layer
    print(summary.format())  # adapted modules, rank, adapter and head parameters, % of the base model

    trainer = FWLoraTrainer(
        model=model,
        args=TrainingArguments(output_dir, max_steps=max_steps, learning_rate=learning_rate, report_to="none"),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,  # the default collator then pads each batch to its longest sentence
        compute_metrics=accuracy,
        fw_args=fw_args,
    )
    trainer.train()  # K steps of plain LoRA that measure F, then LoRA with the penalty λ Σ (1 − I) ‖ΔW‖²
    trainer.save_model()  # the adapter; fw_importance.json was written at the freeze
    print(trainer.fisher_callback.format_table())  # F, I and 1 − I per matrix, most important first
    metrics = trainer.evaluate()
    # [docs-end]
    return metrics


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--output_dir", default="outputs/trainer-fw-lora")
    parser.add_argument("--model_name_or_path", default="roberta-base", help="A Hub model name or a local path.")
    parser.add_argument(
        "--glue_dir", default=os.environ.get("GLUE_DIR"), help="The GLUE root (SST-2/train.tsv); default: $GLUE_DIR."
    )
    parser.add_argument("--max_train_samples", type=int, default=None, help="A random subset; default: all rows.")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="The dev set's first rows; default: all.")
    parser.add_argument("--max_steps", type=int, default=1000, help="Optimizer steps.")
    parser.add_argument("--fw_warmup_steps", type=int, default=500, help="K, the steps that measure F.")
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    args = make_parser().parse_args(argv)
    if args.glue_dir is None:
        raise SystemExit("error: no GLUE data: pass --glue_dir or set GLUE_DIR (the folder that holds SST-2/).")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    sst2 = os.path.join(args.glue_dir, "SST-2")
    train_dataset = SentenceDataset(os.path.join(sst2, "train.tsv"), tokenizer, args.max_train_samples)
    eval_dataset = SentenceDataset(os.path.join(sst2, "dev.tsv"), tokenizer)
    if args.max_eval_samples is not None:
        eval_dataset = torch.utils.data.Subset(eval_dataset, range(min(args.max_eval_samples, len(eval_dataset))))
    metrics = fine_tune(
        args.model_name_or_path,
        tokenizer,
        train_dataset,
        eval_dataset,
        args.output_dir,
        max_steps=args.max_steps,
        fw_warmup_steps=args.fw_warmup_steps,
        learning_rate=args.learning_rate,
    )
    print(f"dev accuracy: {metrics['eval_accuracy']:.4f} on {len(eval_dataset)} sentences")
    return metrics


if __name__ == "__main__":
    main()
