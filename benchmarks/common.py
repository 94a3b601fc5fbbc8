"""
What the benchmarks share: the methods and their arguments, the model (roberta-base's shape with random weights, or
any local encoder), a `FWLoraTrainer` eager or on the fast path, random-token datasets and their collator, Dynamo's
reset and statistics, ratios, table cells and the command-line options every mode takes. No mode of its own: see
`steps.py`, `whole_runs.py`, `memory.py`, `penalty_ops.py` and `sst2_lengths.py`.
"""

import argparse
import json
import logging
import os
import warnings
from collections import Counter
from typing import Optional

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from torch._dynamo.utils import counters, get_compilation_metrics, set_compilation_metrics_limit
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    PrinterCallback,
    RobertaConfig,
    TrainingArguments,
)

from fw_trainer import FWLoraArguments, FWLoraTrainer
from fw_trainer.measurement import compile_stats, reset_compile_stats


# The methods of the step table and of the memory mode, in their order; `fw_lora_warmup*` never leave the warm-up.
METHODS = ("lora", "fw_lora_warmup", "fw_lora_warmup_sketch", "fw_lora", "adalora", "full")
WHOLE_RUN_METHODS = ("lora", "fw_lora", "fw_lora_sketch", "adalora")
METHOD_CHOICES = sorted({*METHODS, *WHOLE_RUN_METHODS})
LENGTHS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sst2_train_lengths.json")


# ----- model, method, trainer -------------------------------------------------------------------------------------


def build_model(model_path: Optional[str], config_overrides: Optional[str] = None):
    """A sequence classifier with 2 labels: roberta-base's shapes with random weights (no download), or `model_path`'s
    config, changed by `config_overrides` (`hidden_size=128,num_hidden_layers=2`); seeded, so every method starts
    from the same weights."""
    if model_path is None:
        config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_labels=2)
    else:
        config = AutoConfig.from_pretrained(model_path, num_labels=2)
    if config_overrides:
        config.update_from_string(config_overrides)
    # What the model's first forward pass would set itself from the integer labels; set here, the compiled graph is
    # not recompiled after that first call (a recompilation of the model's own, the same for every method).
    config.problem_type = "single_label_classification"
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


def fw_arguments(method: str, warmup_steps: int = 10**9) -> FWLoraArguments:
    """The method's arguments; `*_warmup*` never leave the warm-up, `fw_lora` starts penalised unless K is given."""
    if method == "fw_lora_warmup":
        return FWLoraArguments(method="fw_lora", fw_warmup_steps=10**9, fw_estimator="exact")
    if method in ("fw_lora_warmup_sketch", "fw_lora_sketch"):
        return FWLoraArguments(method="fw_lora", fw_warmup_steps=warmup_steps, fw_estimator="sketch")
    if method == "fw_lora":
        return FWLoraArguments(method="fw_lora", fw_warmup_steps=0 if warmup_steps == 10**9 else warmup_steps)
    return FWLoraArguments(method=method, adalora_tinit=0, adalora_tfinal=0)


def fast_path_settings(args: argparse.Namespace) -> dict:
    """The `TrainingArguments` switches of the fast path: what a `Trainer` user has, nothing of ours."""
    return {
        "torch_compile": True,
        "torch_compile_backend": args.compile_backend,
        "torch_compile_mode": args.compile_mode,
        "optim": "adamw_torch_fused",
        "logging_nan_inf_filter": False,  # on, the Trainer reads every micro-batch's loss back to the host
    }


def make_trainer(
    model, fw_args, dataset, args, max_steps: int, callbacks=None, fast: bool = False, data_collator=None
) -> FWLoraTrainer:
    """A quiet `FWLoraTrainer` for `max_steps` steps of `args.batch_size` rows; `fast=True` adds the fast path's
    switches ([`fast_path_settings`])."""
    fast_switches = {}
    if fast:
        fast_switches = fast_path_settings(args)
        # accelerate marks a model it prepared (`_is_accelerate_prepared`) and hands it back as it is, uncompiled, to
        # any later `Accelerator`; a user trains a model once, here a fresh Trainer per round must compile it anew
        # (from Dynamo's cache: no recompilation).
        model.__dict__.pop("_is_accelerate_prepared", None)
    training_args = TrainingArguments(
        output_dir="/tmp/fw_overhead",
        per_device_train_batch_size=args.batch_size,
        max_steps=max_steps,
        learning_rate=1e-4,
        save_strategy="no",
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        dataloader_num_workers=0,
        **fast_switches,
    )
    trainer = FWLoraTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=data_collator,
        fw_args=fw_args,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # its end-of-training line for every call would bury the tables
    return trainer


# ----- data -------------------------------------------------------------------------------------------------------


class RandomTokens(torch.utils.data.Dataset):
    """Random full-length sequences and labels, each row made from its index (no storage for long runs)."""

    def __init__(self, size: int, seq_len: int, vocab_size: int):
        self.size, self.seq_len, self.vocab_size = size, seq_len, vocab_size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        generator = torch.Generator().manual_seed(i)
        input_ids = torch.randint(5, self.vocab_size, (self.seq_len,), generator=generator)
        label = torch.randint(0, 2, (), generator=generator)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": label}


class RandomTokensOfLengths(torch.utils.data.Dataset):
    """
    Random tokens and labels whose row lengths are drawn from a histogram (seeded); each row's tokens are made from
    its index, so a long run stores only its lengths. Rows are unpadded: batch them with [`padding_collator`].

    Args:
        size (`int`): Number of rows.
        histogram (`dict[int, int]`): Length (tokens, special tokens included) → number of sentences of that length.
        vocab_size (`int`): Token ids are drawn from `[5, vocab_size)` (clear of special tokens).
        seed (`int`, *optional*, defaults to `0`): Seed of the length draws.
    """

    def __init__(self, size: int, histogram: dict[int, int], vocab_size: int, seed: int = 0):
        values = torch.tensor(sorted(histogram), dtype=torch.int16)
        weights = torch.tensor([histogram[length] for length in sorted(histogram)], dtype=torch.float64)
        generator = torch.Generator().manual_seed(seed)
        self.lengths = values[torch.multinomial(weights, size, replacement=True, generator=generator)]
        self.vocab_size = vocab_size

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        generator = torch.Generator().manual_seed(i)
        input_ids = torch.randint(5, self.vocab_size, (int(self.lengths[i]),), generator=generator)
        label = torch.randint(0, 2, (), generator=generator)
        return {"input_ids": input_ids, "labels": label}


def padding_collator(pad_token_id: int, pad_to_multiple_of: int) -> DataCollatorWithPadding:
    """
    transformers' `DataCollatorWithPadding`: right-pads a batch's `input_ids` with `pad_token_id` to its longest row
    rounded up to a multiple of `pad_to_multiple_of`, with the matching `attention_mask`. It pads through a tokenizer's
    `pad`, which needs only the pad token: the tokenizer here is an empty word-level vocabulary around it (the rows
    are token ids already), built offline.
    """
    vocabulary = Tokenizer(WordLevel({"<pad>": pad_token_id}, unk_token="<pad>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocabulary, pad_token="<pad>")
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)


def read_lengths(path: str) -> dict[int, int]:
    """The `{length: count}` histogram of a lengths file written by `sst2_lengths.py`."""
    with open(path, encoding="utf-8") as f:
        return {int(length): count for length, count in json.load(f)["histogram"].items()}


# ----- torch.compile ----------------------------------------------------------------------------------------------


def is_compiled(trainer: FWLoraTrainer) -> bool:
    """Whether the trainer ran a `torch.compile`d model."""
    return isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)


def reset_dynamo() -> None:
    """Forgets every compiled graph and every count: the next compiled call starts from scratch."""
    torch._dynamo.reset()
    reset_compile_stats()
    # Dynamo keeps the last 64 compilations' records by default; a method that recompiles often has more.
    set_compilation_metrics_limit(10**6)


def _break_reason(message: str) -> str:
    """A graph break's kind (its message's first line) and, where Dynamo gives one, what it saw (debug context)."""
    lines = [line.strip() for line in message.strip().splitlines()]
    context = next((line for line in lines if line.startswith("Developer debug context:")), "")
    context = context.removeprefix("Developer debug context:").strip()
    return f"{lines[0]}: {context}"[:240] if context else lines[0][:240]


def dynamo_stats(after: int = 0) -> dict:
    """
    Since the last [`reset_dynamo`]: the totals of `fw_trainer.measurement.compile_stats` (graphs, graph breaks,
    recompilations: what `FWLoraTrainer` logs as `compile/*`), and what they do not say: the two counters that make the
    graph breaks apart (Dynamo's `graph_break`, graphs split at an unsupported construct, and `unimplemented`,
    functions it gave up on and left to Python) with their reasons, the recompilations after the first `after`
    compilations and their failed guards, and the compilation time (Dynamo, AOT autograd and the backend, forward and
    backward graphs).
    """
    reasons = Counter()
    for category in ("graph_break", "unimplemented"):
        for message, count in counters[category].items():
            reasons[_break_reason(str(message))] += count
    metrics = get_compilation_metrics()
    stats = compile_stats()
    return {
        "graph_breaks": stats["graph_breaks"],
        "graph_break_reasons": dict(reasons.most_common(10)),
        "graph_break_counter": int(sum(counters["graph_break"].values())),
        "unimplemented_counter": int(sum(counters["unimplemented"].values())),
        "graphs": stats["graphs"],
        "recompiles": stats["recompiles"],
        "recompiles_after_warmup": sum(m.recompile_reason is not None for m in metrics[after:]),
        # The guard that failed, first line (e.g. a tensor size: a new padded length).
        "recompile_reasons_after_warmup": [
            m.recompile_reason.strip().splitlines()[0][:240] for m in metrics[after:] if m.recompile_reason is not None
        ],
        "compilations_after_warmup": len(metrics[after:]),
        "compile_s": sum(
            (m.entire_frame_compile_time_s or 0) + (m.backward_cumulative_compile_time_us or 0) / 1e6 for m in metrics
        ),
    }


# ----- figures and tables -----------------------------------------------------------------------------------------


def ratios_to_lora(values: dict[str, float], reference: Optional[float] = None) -> Optional[dict[str, float]]:
    """Each figure divided by `reference`, by default `lora`'s (`None` without a reference; `None` figures stay)."""
    reference = values.get("lora") if reference is None else reference
    if not reference:
        return None
    return {method: (value / reference if value is not None else None) for method, value in values.items()}


def print_header(header: str) -> None:
    """A table's header line, ruled."""
    print(header)
    print("-" * len(header))


def cell(value: Optional[float], width: int, digits: int) -> str:
    """A table cell: `value` with `digits` decimals, or `n/a`."""
    return f"{value:{width}.{digits}f}" if value is not None else f"{'n/a':>{width}}"


def count_cell(value: Optional[int], width: int = 6) -> str:
    """A table cell: a count, or `n/a`."""
    return f"{value:{width}d}" if value is not None else f"{'n/a':>{width}}"


# ----- command line -----------------------------------------------------------------------------------------------


def make_parser(doc: str, methods: Optional[tuple[str, ...]] = None) -> argparse.ArgumentParser:
    """
    A mode's parser with the options every mode takes: the model (`--model`, `--config_overrides`), `--device` and
    `--output`. A mode that trains passes its default `methods`, and gets `--methods`, `--batch_size` and `--bf16` too.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Local model path; default: roberta-base shape, random.")
    parser.add_argument(
        "--config_overrides", default=None, help="Config changes, e.g. `hidden_size=128,num_hidden_layers=2`."
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--output", default=None, help="Write the figures as JSON here.")
    if methods is not None:
        parser.add_argument("--methods", nargs="+", default=list(methods), choices=METHOD_CHOICES)
        parser.add_argument("--batch_size", type=int, default=32)
        parser.add_argument("--bf16", action="store_true")
    return parser


def add_fast_path_arguments(parser: argparse.ArgumentParser) -> None:
    """`--fast` (the default) / `--no_fast`, `--compile_backend` and `--compile_mode`."""
    parser.add_argument("--fast", dest="fast", action="store_true", default=True, help="Also the fast path (default).")
    parser.add_argument("--no_fast", dest="fast", action="store_false", help="Eager only.")
    parser.add_argument("--compile_backend", default="inductor", help="Fast path: `torch_compile_backend`.")
    parser.add_argument("--compile_mode", default=None, help="Fast path: `torch_compile_mode` (default: default).")


def quiet() -> None:
    """Silences logging and warnings process-wide: thousands of `train()` calls would bury the tables."""
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")


def write_figures(figures: dict, args: argparse.Namespace) -> dict:
    """`figures` with the machine and the settings they were measured with, written to `--output` if given."""
    figures = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "settings": vars(args),
        **figures,
    }
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
    return figures
