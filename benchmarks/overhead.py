"""
Optimizer-step time of each method through the real `FWLoraTrainer` code path, interleaved in one process.

    python benchmarks/overhead.py                                  # roberta-base shape, batch 16, length 64, CPU
    python benchmarks/overhead.py --batch_size 32 --seq_len 128 --bf16 --device cuda
    python benchmarks/overhead.py --model /path/to/any/encoder --output overhead.json

Methods: `lora`, `fw_lora_warmup` (FW-LoRA while its Fisher hooks run, exact estimator), `fw_lora_warmup_sketch` (the
same with the sketched estimator, 8 probes), `fw_lora` (after the warm-up, penalty on),
`adalora` and `full`. Every round trains each method for `--steps` optimizer steps (a fresh `Trainer.train()` on the
same model, the first step of each call not timed) in turn, so drifts of a shared machine hit all methods alike. The
table gives the median step time over all rounds and its ratio to `lora`.
"""

import argparse
import json
import logging
import statistics
import time
import warnings

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    RobertaConfig,
    TrainerCallback,
    TrainingArguments,
)

from fw_trainer import FisherWeightedPenalty, FWLoraArguments, FWLoraTrainer, build_peft_model, find_adapted_matrices


METHODS = ("lora", "fw_lora_warmup", "fw_lora_warmup_sketch", "fw_lora", "adalora", "full")


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (device synchronised), the first of each `train()` call dropped."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self._start = None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        if state.global_step > 1:
            self.times.append(time.perf_counter() - self._start)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, size: int, seq_len: int, vocab_size: int):
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(5, vocab_size, (size, seq_len), generator=generator)
        self.labels = torch.randint(0, 2, (size,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": torch.ones_like(self.input_ids[i]),
            "labels": self.labels[i],
        }


def build_model(model_path: str | None):
    if model_path is None:
        # roberta-base's shapes, random weights: no download.
        config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_labels=2)
    else:
        config = AutoConfig.from_pretrained(model_path, num_labels=2)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


def fw_arguments(method: str) -> FWLoraArguments:
    if method == "fw_lora_warmup":
        return FWLoraArguments(method="fw_lora", fw_warmup_steps=10**9)
    if method == "fw_lora_warmup_sketch":
        return FWLoraArguments(method="fw_lora", fw_warmup_steps=10**9, fw_estimator="sketch")
    if method == "fw_lora":
        return FWLoraArguments(method="fw_lora", fw_warmup_steps=0)
    return FWLoraArguments(method=method, adalora_tinit=0, adalora_tfinal=0)


def count_penalty_ops(model) -> dict:
    """
    Aten operators that one evaluation of the penalty adds to a training step, forward and backward, counted with
    `torch.profiler` — grouped (what `FWLoraTrainer` runs) vs a plain Python loop over the matrices.
    """
    matrices = find_adapted_matrices(model)
    weights = torch.rand(len(matrices))
    grouped = FisherWeightedPenalty(matrices, weights)

    def looped():
        return sum(w * m.layer.get_delta_weight(m.adapter_name).pow(2).sum() for w, m in zip(weights, matrices))

    counts = {"matrices": len(matrices), "groups": grouped.num_groups}
    for name, penalty in (("grouped", grouped), ("per_matrix_loop", looped)):
        model.zero_grad(set_to_none=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            penalty().backward()
        # Outermost aten operators only (forward ones, and those under an autograd backward node): an op's own
        # sub-calls, e.g. the aten::mm inside aten::matmul, are not extra kernels.
        counts[name] = sum(
            1
            for event in profile.events()
            if event.name.startswith("aten::")
            and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::"))
        )
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Local model path; default: roberta-base shape, random.")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="Timed optimizer steps per method and round.")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output", default=None, help="Write the figures as JSON here.")
    parser.add_argument(
        "--penalty_ops", action="store_true", help="Only count the aten ops the penalty adds per step, then exit."
    )
    args = parser.parse_args()

    if args.penalty_ops:
        model, _ = build_peft_model(build_model(args.model), FWLoraArguments(method="fw_lora"))
        counts = count_penalty_ops(model)
        print(json.dumps(counts, indent=2))
        if args.output:
            with open(args.output, "w") as f:
                json.dump(counts, f, indent=2)
        return

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    runs = {}
    for method in args.methods:
        fw_args = fw_arguments(method)
        model, _ = build_peft_model(build_model(args.model), fw_args)
        vocab_size = model.config.vocab_size
        runs[method] = (model, fw_args, StepTimer(device))
    dataset = RandomTokens(args.batch_size * (args.steps + 1), args.seq_len, vocab_size)

    for round_index in range(args.rounds):
        for method, (model, fw_args, timer) in runs.items():
            training_args = TrainingArguments(
                output_dir=f"/tmp/fw_overhead/{method}",
                per_device_train_batch_size=args.batch_size,
                max_steps=args.steps + 1,
                learning_rate=1e-4,
                save_strategy="no",
                report_to="none",
                logging_strategy="no",
                disable_tqdm=True,
                use_cpu=args.device == "cpu",
                bf16=args.bf16,
            )
            trainer = FWLoraTrainer(
                model=model, args=training_args, train_dataset=dataset, fw_args=fw_args, callbacks=[timer]
            )
            trainer.train()
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)

    medians = {method: statistics.median(timer.times) for method, (_, _, timer) in runs.items()}
    reference = medians.get("lora")
    print(f"\n{'method':<16} {'ms/step':>10} {'x lora':>8}")
    for method, median in medians.items():
        ratio = f"{median / reference:8.3f}" if reference else "     n/a"
        print(f"{method:<16} {1000 * median:10.1f} {ratio}")
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "settings": vars(args),
        "median_step_s": medians,
        "ratio_to_lora": {m: v / reference for m, v in medians.items()} if reference else None,
        "step_times_s": {method: timer.times for method, (_, _, timer) in runs.items()},
    }
    if args.output:
        with open(args.output, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
