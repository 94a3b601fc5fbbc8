"""
FW-LoRA supervised fine-tuning of a decoder LLM with trl's `SFTTrainer` (`pip install fw-lora[trl]`).

Offline, as written, in seconds on a CPU: a tiny random Llama, a word-level tokenizer and a small instruction set
(arithmetic questions and answers) that the script writes itself; the loss is on the completions only. With Hub
access, pass a model name (and its tokenizer is used) and your own prompt/completion JSON Lines file:

    python examples/sft_fw_lora.py --output_dir outputs/sft-fw-lora
    python examples/sft_fw_lora.py --output_dir outputs/sft-qwen --model_name_or_path Qwen/Qwen2.5-0.5B \
        --train_file my_instructions.jsonl --bf16 --fw_warmup_steps 100 --max_steps 1000

It leaves the adapter (`adapter_model.safetensors`), `fw_importance.json` (F, I and 1 − I per adapted matrix) and the
run's identity in `--output_dir`, the LM loss on held-out texts before and after training in `forgetting.json`, and
the adapter's file size and the hardware in `run_environment.json`.
"""

import argparse
import json
import os
import random
from typing import Optional

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig

from fw_trainer import FWLoraArguments, build_peft_model
from fw_trainer.forgetting import forgetting_record, language_modelling_loss, read_held_out_texts
from fw_trainer.run_environment import write_run_environment
from fw_trainer.sft import FWLoraSFTTrainer
from fw_trainer.state_files import write_json_atomic


def write_instruction_set(path: str, size: int = 256, seed: int = 0) -> None:
    """A small prompt/completion set, one JSON object per line:
    `{"prompt": "what is 3 plus 4 ?", "completion": "7"}`."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as file:
        for _ in range(size):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            operation, value = rng.choice([("plus", a + b), ("times", a * b)])
            row = {"prompt": f"what is {a} {operation} {b} ?", "completion": f" {value}"}
            file.write(json.dumps(row) + "\n")


def read_rows(path: str) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def word_level_tokenizer(rows: list[dict[str, str]]) -> PreTrainedTokenizerFast:
    """A tokenizer over the words of `rows` (no download), with the special tokens SFT needs."""
    words = sorted({word for row in rows for text in row.values() for word in text.split()})
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {token: index for index, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def sft_config(args: argparse.Namespace) -> SFTConfig:
    """trl's configuration of the run, from the command line: a constant learning rate, no checkpoints, no reporting
    integration, the loss on the completions only."""
    return SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        completion_only_loss=True,
        max_length=64,
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_name_or_path", default=None, help="A Hub model; default: a tiny random Llama.")
    parser.add_argument("--train_file", default=None, help="Prompt/completion JSON Lines; default: written here.")
    parser.add_argument(
        "--held_out_file",
        default=None,
        help="Texts (one a line, or JSON Lines with 'text') whose LM loss before and after training measures "
        "forgetting; default: the first 32 rows of the training file, left out of training.",
    )
    parser.add_argument("--max_steps", type=int, default=120)
    parser.add_argument("--fw_warmup_steps", type=int, default=40)
    parser.add_argument("--fw_lambda", type=float, default=1e-4)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    args = make_parser().parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    train_file = args.train_file
    if train_file is None:
        train_file = os.path.join(args.output_dir, "instructions.jsonl")
        write_instruction_set(train_file, seed=args.seed)
    rows = read_rows(train_file)
    held_out, train_rows = rows[:32], rows[32:]

    if args.model_name_or_path is None:
        tokenizer = word_level_tokenizer(rows)
        model = tiny_llama(tokenizer, args.seed)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype="auto")
    if args.held_out_file is not None:
        held_out_texts = read_held_out_texts(args.held_out_file)
    else:
        held_out_texts = [row["prompt"] + row["completion"] for row in held_out]
    # The pretrained model's loss, before any adapter: forgetting is measured against it.
    before = language_modelling_loss(model, tokenizer, held_out_texts)

    # [docs-start]
    # LoRA on every attention and FFN projection (the family's default targets); the LM head stays frozen.
    fw_args = FWLoraArguments(
        method="fw_lora", lora_r=args.lora_r, fw_warmup_steps=args.fw_warmup_steps, fw_lambda=args.fw_lambda
    )
    model, summary = build_peft_model(model, fw_args)
    print(summary.format())
    trainer = FWLoraSFTTrainer(
        model=model,
        args=sft_config(args),  # an SFTConfig; completion_only_loss: the loss is on the completions only
        train_dataset=Dataset.from_list(train_rows),  # {"prompt": ..., "completion": ...} rows
        processing_class=tokenizer,
        fw_args=fw_args,
    )
    trainer.train()  # K steps of plain LoRA that measure F, then LoRA with the penalty λ Σ (1 − I) ‖ΔW‖²
    trainer.save_model()  # the adapter; fw_importance.json was written at the freeze
    # [docs-end]
    record = forgetting_record(before, language_modelling_loss(trainer.model, tokenizer, held_out_texts))
    if trainer.is_world_process_zero():
        write_run_environment(args.output_dir, trainer.args.device, trainer.args.world_size)
        write_json_atomic(os.path.join(args.output_dir, "forgetting.json"), record)
    print(f"held-out LM loss: {record['held_out_loss_before']:.4f} before, {record['held_out_loss_after']:.4f} after")
    print(trainer.fisher_callback.format_table())
    return record


if __name__ == "__main__":
    main()
