"""
The wall time of whole training runs through `FWLoraTrainer`, FW-LoRA's warm-up and the compilation included, eager
and on the fast path.

    python benchmarks/whole_runs.py --device cuda --bf16 --rounds 1   # 6,315 steps (3 SST-2 epochs), K = 500
    python benchmarks/whole_runs.py --rounds 1 --batch_size 8 --config_overrides hidden_size=64,num_hidden_layers=2

Times `Trainer.train()` end to end for `lora`, `fw_lora` (the default estimator), `fw_lora_sketch` and `adalora` (add
`full` with `--methods`), eager and fast (the switches of `steps.py`'s fast path), one whole run per method, path and
round, a fresh model each. Every row's length is drawn from SST-2's training sentences (`--lengths_file`, written by
`sst2_lengths.py`), the tokens are random, and transformers' `DataCollatorWithPadding` pads each batch to its longest
row rounded up to `--pad_to_multiple_of` (eager) or `--fast_pad_to_multiple_of` (fast: few distinct shapes, so the
compiled graphs are reused). `--config_overrides hidden_size=128,...` shrinks the model so that thousands of steps fit
on a CPU.
"""

import os
import statistics
import sys
import time

import torch
from torch._dynamo.utils import get_compilation_metrics
from transformers import TrainerCallback

from fw_trainer import build_peft_model


# The sibling module, also when this file is imported by its path (the tests) rather than run.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


class CompilationsAt(TrainerCallback):
    """The number of Dynamo compilations so far at the end of optimizer step `step` (`None` before it)."""

    def __init__(self, step: int):
        self.step, self.count = step, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.count = len(get_compilation_metrics())


def whole_run_benchmark(args) -> dict:
    """One whole run per round, method and path, the methods interleaved; the table."""
    device = torch.device(args.device)
    paths = ("eager", "fast") if args.fast else ("eager",)
    times = {path: {method: [] for method in args.methods} for path in paths}
    stats: dict[str, dict] = {}
    histogram = None if args.fixed_length else common.read_lengths(args.lengths_file)
    for round_index in range(args.rounds):
        for method in args.methods:
            for path in paths:
                fw_args = common.fw_arguments(method, args.run_warmup_steps)
                model, _ = build_peft_model(common.build_model(args.model, args.config_overrides), fw_args)
                vocab_size, size = model.config.vocab_size, args.batch_size * args.run_steps
                if histogram is None:
                    dataset, collator = common.RandomTokens(size, args.seq_len, vocab_size), None
                else:
                    dataset = common.RandomTokensOfLengths(size, histogram, vocab_size)
                    multiple = args.fast_pad_to_multiple_of if path == "fast" else args.pad_to_multiple_of
                    collator = common.padding_collator(model.config.pad_token_id, multiple)
                # After FW-LoRA's warm-up and the step that follows (the one that runs without the hooks): from here
                # on, a compilation is a recompilation in the steady state.
                after_warmup = CompilationsAt(args.run_warmup_steps + 1)
                if path == "fast":
                    common.reset_dynamo()
                trainer = common.make_trainer(
                    model,
                    fw_args,
                    dataset,
                    args,
                    args.run_steps,
                    callbacks=[after_warmup],
                    fast=path == "fast",
                    data_collator=collator,
                )
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                try:
                    trainer.train()
                except Exception as error:  # noqa: BLE001 -- as in the step benchmark: a result, not a crash
                    if path == "eager":
                        raise
                    stats[method] = {"note": f"fast path failed: {type(error).__name__}: {str(error)[:500]}"}
                    print(f"round {round_index + 1}/{args.rounds} {method} {path}: failed ({stats[method]['note']})")
                    continue
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[path][method].append(time.perf_counter() - start)
                if path == "fast":
                    stats[method] = (
                        common.dynamo_stats(after=after_warmup.count if after_warmup.count is not None else 10**9)
                        if common.is_compiled(trainer)
                        else {"note": "not compiled by the trainer"}
                    )
                print(
                    f"round {round_index + 1}/{args.rounds} {method} {path}: {times[path][method][-1]:.1f} s",
                    flush=True,
                )
    medians = {
        path: {method: (statistics.median(values) if values else None) for method, values in per_method.items()}
        for path, per_method in times.items()
    }
    print_whole_run_table(medians, stats, histogram is None, args)
    eager_lora, fast = medians["eager"].get("lora"), medians.get("fast", {})
    return {
        "mode": "whole_run",
        "lengths": "fixed" if histogram is None else os.path.basename(args.lengths_file),
        "median_run_s": medians["eager"],
        "ratio_to_lora": common.ratios_to_lora(medians["eager"]),
        "run_times_s": times["eager"],
        "fast_path": common.fast_path_settings(args) if args.fast else None,
        "fast_median_run_s": fast or None,
        "fast_ratio_to_lora": common.ratios_to_lora(fast) if args.fast else None,
        "fast_ratio_to_eager_lora": common.ratios_to_lora(fast, eager_lora) if args.fast else None,
        "fast_run_times_s": times.get("fast"),
        "fast": stats or None,
    }


def print_whole_run_table(medians: dict[str, dict], stats: dict[str, dict], fixed_length: bool, args) -> None:
    eager_lora, fast = medians["eager"].get("lora"), medians.get("fast", {})
    print(f"\nwhole runs: {args.run_steps} steps, batch {args.batch_size}, K = {args.run_warmup_steps}, ", end="")
    print(
        "fixed length"
        if fixed_length
        else f"SST-2 lengths padded to x{args.pad_to_multiple_of} eager, x{args.fast_pad_to_multiple_of} fast"
    )
    header = (
        f"{'method':<16} {'eager s':>9} {'x lora':>7} {'fast s':>9} {'x lora':>7} {'x eager':>7} {'compile':>7} "
        f"{'breaks':>6} {'recomp':>6} {'>K+1':>6}"
    )
    common.print_header(header)
    cell, count = common.cell, common.count_cell
    for method in args.methods:
        eager, compiled, figures = medians["eager"][method], fast.get(method), stats.get(method, {})
        fast_lora = fast.get("lora")
        print(
            f"{method:<16} {cell(eager, 9, 1)} {cell(eager / eager_lora if eager and eager_lora else None, 7, 3)} "
            f"{cell(compiled, 9, 1)} {cell(compiled / fast_lora if compiled and fast_lora else None, 7, 3)} "
            f"{cell(compiled / eager_lora if compiled and eager_lora else None, 7, 3)} "
            f"{cell(figures.get('compile_s'), 7, 1)} {count(figures.get('graph_breaks'))} "
            f"{count(figures.get('recompiles'))} {count(figures.get('recompiles_after_warmup'))}"
        )
    for method, figures in stats.items():
        if "note" in figures:
            print(f"  {method}: {figures['note']}")


def make_parser():
    parser = common.make_parser(__doc__, common.WHOLE_RUN_METHODS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--run_steps", type=int, default=6315, help="Optimizer steps of a run (3 SST-2 epochs).")
    parser.add_argument("--run_warmup_steps", type=int, default=500, help="FW-LoRA's K.")
    parser.add_argument("--lengths_file", default=common.LENGTHS_FILE, help="Histogram of row lengths.")
    parser.add_argument("--fixed_length", action="store_true", help="Every row `--seq_len` long instead.")
    parser.add_argument("--seq_len", type=int, default=128, help="With `--fixed_length`: row length.")
    parser.add_argument("--pad_to_multiple_of", type=int, default=8, help="Eager: batch width multiple.")
    parser.add_argument("--fast_pad_to_multiple_of", type=int, default=32, help="Fast: batch width multiple.")
    common.add_fast_path_arguments(parser)
    return parser


def main():
    args = make_parser().parse_args()
    common.quiet()
    common.write_figures(whole_run_benchmark(args), args)


if __name__ == "__main__":
    main()
