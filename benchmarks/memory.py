"""
Peak memory of each method, one fresh process per method: on the CPU, allocations cannot be told apart per method
within one process (freed memory is not returned to the system, and the peak only grows), so each method gets a
process of its own that builds the model and trains `--steps` + 1 eager steps, and reports its peak
(`fw_trainer.measurement.peak_memory_mb`: the process's peak resident set size, `VmHWM`, on the CPU; CUDA's peak
allocation with `--device cuda`).

    python benchmarks/memory.py --steps 1 --methods lora fw_lora_warmup fw_lora_warmup_sketch fw_lora adalora
    python benchmarks/memory.py --method fw_lora --steps 1      # one method, in this process: prints its JSON line

With `--methods` (the default: every method) it runs itself once per method with `--method`, each time in a new
Python process, and prints the table. With `--method M` it measures `M` in the running process and prints one line of
JSON, `{"method": ..., "peak_memory_mb": ..., "peak_memory_kind": ...}`: what the table is made of, and what
`steps.py` runs for its peak-memory column on the CPU.
"""

import argparse
import json
import os
import subprocess
import sys

import torch

from fw_trainer import build_peft_model
from fw_trainer.measurement import peak_memory_mb


# The sibling module, also when this file is imported by its path (the tests) rather than run.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def measure_in_this_process(method: str, args: argparse.Namespace) -> dict:
    """Builds the model, trains `args.steps + 1` eager steps of `method` and returns the process's peak memory."""
    fw_args = common.fw_arguments(method)
    model, _ = build_peft_model(common.build_model(args.model, args.config_overrides), fw_args)
    dataset = common.RandomTokens(args.batch_size * (args.steps + 1), args.seq_len, model.config.vocab_size)
    common.make_trainer(model, fw_args, dataset, args, args.steps + 1).train()
    memory_mb, kind = peak_memory_mb(torch.device(args.device))
    return {"method": method, "peak_memory_mb": memory_mb, "peak_memory_kind": kind}


def peak_memory_of(method: str, args: argparse.Namespace) -> tuple[float, str]:
    """Peak memory of a fresh process that trains `args.steps + 1` steps of `method` alone (eager), and its kind: this
    script run with `--method`."""
    command = [sys.executable, os.path.abspath(__file__), "--method", method, "--steps", str(args.steps)]
    command += ["--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len), "--device", args.device]
    command += ["--model", args.model] if args.model else []
    command += ["--config_overrides", args.config_overrides] if args.config_overrides else []
    command += ["--bf16"] if args.bf16 else []
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    figures = json.loads(output.strip().splitlines()[-1])
    return figures["peak_memory_mb"], figures["peak_memory_kind"]


def memory_benchmark(args: argparse.Namespace) -> dict:
    """The peak memory of a fresh process per method, and the table."""
    peak_memory, kind = {}, None
    for method in args.methods:
        peak_memory[method], kind = peak_memory_of(method, args)
    print(f"\n{'method':<22} {'peak MB':>10} {'x lora':>8}")
    for method, memory_mb in peak_memory.items():
        ratio = f"{memory_mb / peak_memory['lora']:8.3f}" if peak_memory.get("lora") else "     n/a"
        print(f"{method:<22} {memory_mb:10.0f} {ratio}")
    return {
        "mode": "memory",
        "peak_memory_mb": peak_memory,
        "peak_memory_kind": kind,
        "peak_memory_ratio_to_lora": common.ratios_to_lora(peak_memory),
    }


def make_parser() -> argparse.ArgumentParser:
    parser = common.make_parser(__doc__, common.METHODS)
    parser.add_argument(
        "--method",
        default=None,
        choices=common.METHOD_CHOICES,
        help="Measure this one method in this process and print its JSON line, instead of the table.",
    )
    parser.add_argument("--steps", type=int, default=5, help="Optimizer steps trained after the first one.")
    parser.add_argument("--seq_len", type=int, default=128, help="Row length.")
    return parser


def main():
    args = make_parser().parse_args()
    common.quiet()
    if args.method:
        print(json.dumps(measure_in_this_process(args.method, args)))
        return
    common.write_figures(memory_benchmark(args), args)


if __name__ == "__main__":
    main()
