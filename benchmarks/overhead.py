"""
Optimizer-step time and peak memory of each method through the real `FWLoraTrainer` code path, interleaved in one
process; or the wall time of whole training runs.

    python benchmarks/overhead.py                                  # roberta-base shape, batch 32, length 128
    python benchmarks/overhead.py --bf16 --device cuda --output overhead.json
    python benchmarks/overhead.py --model /path/to/any/encoder --batch_size 16 --seq_len 64
    python benchmarks/overhead.py --whole_run --run_steps 6315 --run_warmup_steps 500   # 3 epochs of SST-2, K = 500
    python benchmarks/overhead.py --penalty_ops                    # aten ops the penalty adds per step

Methods: `lora`, `fw_lora_warmup` (FW-LoRA while its Fisher hooks run, exact estimator), `fw_lora_warmup_sketch` (the
same with the sketched estimator, 8 probes), `fw_lora` (after the warm-up, penalty on),
`adalora` and `full`. Every round trains each method for `--steps` optimizer steps (a fresh `Trainer.train()` on the
same model, the first step of each call not timed) in turn, so drifts of a shared machine hit all methods alike. The
table gives the median step time over all rounds (after `--warmup_rounds` untimed ones) and its ratio to `lora`, and
each method's peak memory: on CUDA the peak of allocated tensor memory during its steps
(`torch.cuda.max_memory_allocated`), on CPU the peak resident set size of a fresh process that builds the model and
trains `--steps` steps with that method alone (CPU allocations cannot be told apart per method within one process).

`--whole_run` times `Trainer.train()` end to end instead, warm-up included, for `lora`, `fw_lora` (exact estimator),
`fw_lora_sketch` and `adalora`, one whole run per method and round. `--config_overrides hidden_size=128,...` shrinks
the model so that thousands of steps fit on a CPU.
"""

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
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
WHOLE_RUN_METHODS = ("lora", "fw_lora", "fw_lora_sketch", "adalora")


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


def build_model(model_path: str | None, config_overrides: str | None = None):
    if model_path is None:
        # roberta-base's shapes, random weights: no download.
        config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_labels=2)
    else:
        config = AutoConfig.from_pretrained(model_path, num_labels=2)
    if config_overrides:
        config.update_from_string(config_overrides)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


def fw_arguments(method: str, warmup_steps: int = 10**9) -> FWLoraArguments:
    """The method's arguments; `*_warmup*` never leave the warm-up, `fw_lora` starts penalised unless K is given."""
    if method == "fw_lora_warmup":
        return FWLoraArguments(method="fw_lora", fw_warmup_steps=10**9)
    if method in ("fw_lora_warmup_sketch", "fw_lora_sketch"):
        return FWLoraArguments(method="fw_lora", fw_warmup_steps=warmup_steps, fw_estimator="sketch")
    if method == "fw_lora":
        return FWLoraArguments(method="fw_lora", fw_warmup_steps=0 if warmup_steps == 10**9 else warmup_steps)
    return FWLoraArguments(method=method, adalora_tinit=0, adalora_tfinal=0)


def count_penalty_ops(model) -> dict:
    """
    Aten operators that one evaluation of the penalty adds to a training step, forward and backward, counted with
    `torch.profiler` — grouped (what `FWLoraTrainer` runs) vs a plain Python loop over the matrices. As in training,
    every LoRA parameter already holds a gradient (from the task loss), so the penalty's gradient is accumulated into
    it. Only outermost aten operators count (an op's own sub-calls, e.g. the `aten::mm` inside `aten::matmul`, are
    not extra kernels), split into the penalty's own operators, gradient accumulation into the LoRA parameters
    (`AccumulateGrad`: one per parameter, whatever the penalty's implementation) and views (`aten::select`, no kernel).
    """
    matrices = find_adapted_matrices(model)
    weights = torch.rand(len(matrices), device=matrices[0].lora_A.device)
    grouped = FisherWeightedPenalty(matrices, weights)

    def looped():
        return sum(w * m.layer.get_delta_weight(m.adapter_name).pow(2).sum() for w, m in zip(weights, matrices))

    counts = {"matrices": len(matrices), "lora_parameters": 2 * len(matrices), "groups": grouped.num_groups}
    for name, penalty in (("grouped", grouped), ("per_matrix_loop", looped)):
        for matrix in matrices:
            for parameter in (matrix.lora_A, matrix.lora_B):
                parameter.grad = torch.zeros_like(parameter)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            penalty().backward()
        ops = [
            event
            for event in profile.events()
            if event.name.startswith("aten::")
            and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::"))
        ]
        accumulation = sum(1 for e in ops if e.cpu_parent is not None and "AccumulateGrad" in e.cpu_parent.name)
        views = sum(1 for e in ops if e.name in ("aten::select", "aten::unbind"))
        counts[name] = {
            "total": len(ops),
            "own": len(ops) - accumulation - views,
            "gradient_accumulation": accumulation,
            "views": views,
        }
    model.zero_grad(set_to_none=True)
    return counts


def make_trainer(model, fw_args, dataset, args, max_steps: int, callbacks=None) -> FWLoraTrainer:
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
    )
    return FWLoraTrainer(model=model, args=training_args, train_dataset=dataset, fw_args=fw_args, callbacks=callbacks)


def peak_rss_mb() -> float:
    """This process's peak resident set size (`VmHWM`: unlike `ru_maxrss`, it does not inherit the parent's peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def peak_rss_mb_of(method: str, args) -> float:
    """Peak resident memory of a fresh process that trains `args.steps + 1` steps of `method` alone."""
    command = [sys.executable, os.path.abspath(__file__), "--_peak_rss_of", method, "--steps", str(args.steps)]
    command += ["--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len), "--device", args.device]
    command += ["--model", args.model] if args.model else []
    command += ["--config_overrides", args.config_overrides] if args.config_overrides else []
    command += ["--bf16"] if args.bf16 else []
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_rss_mb"]


def ratios_to_lora(values: dict[str, float]) -> dict[str, float] | None:
    """Each method's figure divided by `lora`'s (`None` when `lora` was not measured)."""
    return {method: value / values["lora"] for method, value in values.items()} if values.get("lora") else None


def memory_benchmark(args) -> dict:
    """CPU: the peak resident memory of a fresh process per method, without the step timing."""
    peak_memory = {method: peak_rss_mb_of(method, args) for method in args.methods or METHODS}
    print(f"\n{'method':<22} {'peak MB':>10} {'x lora':>8}")
    for method, memory in peak_memory.items():
        ratio = f"{memory / peak_memory['lora']:8.3f}" if peak_memory.get("lora") else "     n/a"
        print(f"{method:<22} {memory:10.0f} {ratio}")
    return {
        "mode": "memory",
        "peak_memory_mb": peak_memory,
        "peak_memory_kind": "process_peak_rss",
        "peak_memory_ratio_to_lora": ratios_to_lora(peak_memory),
    }


def step_benchmark(args) -> dict:
    device = torch.device(args.device)
    runs = {}
    for method in args.methods or METHODS:
        fw_args = fw_arguments(method)
        model, _ = build_peft_model(build_model(args.model, args.config_overrides), fw_args)
        runs[method] = (model, fw_args, StepTimer(device))
    vocab_size = next(iter(runs.values()))[0].config.vocab_size
    dataset = RandomTokens(args.batch_size * (args.steps + 1), args.seq_len, vocab_size)
    peak_memory = dict.fromkeys(runs, 0.0)
    for _ in range(args.warmup_rounds):
        # Untimed: the first steps of a fresh model in a process are slow (allocator growth, lazy initialisation).
        for model, fw_args, _ in runs.values():
            make_trainer(model, fw_args, dataset, args, 2).train()
    for round_index in range(args.rounds):
        for method, (model, fw_args, timer) in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            make_trainer(model, fw_args, dataset, args, args.steps + 1, callbacks=[timer]).train()
            if device.type == "cuda":
                peak_memory[method] = max(peak_memory[method], torch.cuda.max_memory_allocated(device) / 2**20)
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    if device.type == "cpu" and not args.no_memory:
        for method in runs:
            peak_memory[method] = peak_rss_mb_of(method, args)

    medians = {method: statistics.median(timer.times) for method, (_, _, timer) in runs.items()}
    reference = medians.get("lora")
    memory_kind = "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss"
    print(f"\n{'method':<22} {'ms/step':>10} {'x lora':>8} {'peak MB':>10} {'x lora':>8}")
    for method, median in medians.items():
        ratio = f"{median / reference:8.3f}" if reference else "     n/a"
        memory = peak_memory.get(method) or float("nan")
        memory_ratio = f"{memory / peak_memory['lora']:8.3f}" if peak_memory.get("lora") else "     n/a"
        print(f"{method:<22} {1000 * median:10.1f} {ratio} {memory:10.0f} {memory_ratio}")
    return {
        "mode": "steps",
        "median_step_s": medians,
        "ratio_to_lora": ratios_to_lora(medians),
        "peak_memory_mb": peak_memory,
        "peak_memory_kind": memory_kind,
        "peak_memory_ratio_to_lora": ratios_to_lora(peak_memory),
        "step_times_s": {method: timer.times for method, (_, _, timer) in runs.items()},
    }


def whole_run_benchmark(args) -> dict:
    device = torch.device(args.device)
    methods = args.methods or WHOLE_RUN_METHODS
    times = {method: [] for method in methods}
    for round_index in range(args.rounds):
        for method in methods:
            fw_args = fw_arguments(method, args.run_warmup_steps)
            model, _ = build_peft_model(build_model(args.model, args.config_overrides), fw_args)
            dataset = RandomTokens(args.batch_size * args.run_steps, args.seq_len, model.config.vocab_size)
            trainer = make_trainer(model, fw_args, dataset, args, args.run_steps)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            trainer.train()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[method].append(time.perf_counter() - start)
            print(f"round {round_index + 1}/{args.rounds} {method}: {times[method][-1]:.1f} s", flush=True)
    medians = {method: statistics.median(values) for method, values in times.items()}
    reference = medians.get("lora")
    print(f"\n{'method':<16} {'run s':>10} {'x lora':>8}")
    for method, median in medians.items():
        ratio = f"{median / reference:8.3f}" if reference else "     n/a"
        print(f"{method:<16} {median:10.1f} {ratio}")
    return {
        "mode": "whole_run",
        "median_run_s": medians,
        "ratio_to_lora": ratios_to_lora(medians),
        "run_times_s": times,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Local model path; default: roberta-base shape, random.")
    parser.add_argument(
        "--config_overrides", default=None, help="Config changes, e.g. `hidden_size=128,num_hidden_layers=2`."
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup_rounds", type=int, default=1, help="Untimed rounds of 2 steps per method first.")
    parser.add_argument("--steps", type=int, default=5, help="Timed optimizer steps per method and round.")
    parser.add_argument(
        "--methods", nargs="+", default=None, choices=sorted({*METHODS, *WHOLE_RUN_METHODS}), help="Default: all."
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--no_memory", action="store_true", help="CPU: skip the per-method peak-memory processes.")
    parser.add_argument("--memory_only", action="store_true", help="CPU: only the per-method peak-memory processes.")
    parser.add_argument("--whole_run", action="store_true", help="Time whole training runs instead of steps.")
    parser.add_argument("--run_steps", type=int, default=6315, help="Whole run: optimizer steps (3 SST-2 epochs).")
    parser.add_argument("--run_warmup_steps", type=int, default=500, help="Whole run: FW-LoRA's K.")
    parser.add_argument("--output", default=None, help="Write the figures as JSON here.")
    parser.add_argument(
        "--penalty_ops", action="store_true", help="Only count the aten ops the penalty adds per step, then exit."
    )
    parser.add_argument("--_peak_rss_of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.penalty_ops:
        model, _ = build_peft_model(build_model(args.model, args.config_overrides), FWLoraArguments(method="fw_lora"))
        figures = count_penalty_ops(model)
        print(json.dumps(figures, indent=2))
    else:
        logging.disable(logging.WARNING)
        warnings.filterwarnings("ignore")
        if args._peak_rss_of:
            fw_args = fw_arguments(args._peak_rss_of)
            model, _ = build_peft_model(build_model(args.model, args.config_overrides), fw_args)
            dataset = RandomTokens(args.batch_size * (args.steps + 1), args.seq_len, model.config.vocab_size)
            make_trainer(model, fw_args, dataset, args, args.steps + 1).train()
            print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
            return
        if args.memory_only:
            figures = memory_benchmark(args)
        else:
            figures = whole_run_benchmark(args) if args.whole_run else step_benchmark(args)
    figures = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "settings": vars(args),
        **figures,
    }
    if args.output:
        with open(args.output, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
