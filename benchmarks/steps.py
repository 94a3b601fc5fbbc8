"""
Optimizer-step time, peak memory, graph breaks and kernels per step of each method through the real `FWLoraTrainer`
code path, eager and on the fast path.

    python benchmarks/steps.py                                  # roberta-base shape, batch 32, length 128
    python benchmarks/steps.py --device cuda --bf16 --rounds 5 --steps 20 --output steps.json
    python benchmarks/steps.py --model /path/to/any/encoder --batch_size 16 --seq_len 64

Methods: `lora`, `fw_lora_warmup` (FW-LoRA while its Fisher hooks run, exact estimator), `fw_lora_warmup_sketch` (the
same with the sketched estimator, 8 probes), `fw_lora` (after the warm-up, penalty on), `adalora` and `full`.

Eager: every round trains each method for `--steps` optimizer steps (a fresh `Trainer.train()` on the same model, the
first step of each call not timed) in turn, so drifts of a shared machine hit all methods alike. The table gives the
median step time over all rounds (after `--warmup_rounds` untimed ones) and its ratio to eager `lora`, and each
method's peak memory (`fw_trainer.measurement.peak_memory_mb`): on CUDA the peak of allocated tensor memory during its
steps, on CPU the peak resident set size of a fresh process that trains that method alone (`memory.py`: CPU
allocations cannot be told apart per method within one process).

Fast path (unless `--no_fast`): the same, with the switches a `Trainer` user has: `torch_compile=True`
(`--compile_backend`, `--compile_mode`), `optim="adamw_torch_fused"` and `logging_nan_inf_filter=False` (with it on,
the Trainer reads every micro-batch's loss back to the host). Dynamo keeps one code cache per process, so the fast path
runs method by method, each after `torch._dynamo.reset()`: compile warm-up (`--warmup_rounds` untimed calls), then
`--rounds` timed calls. Per method it reports the graph breaks (every place where Dynamo stopped tracing: a split graph
or a function left to Python), the recompilations (compilations with a guard failure as reason) and the compiled
graphs. A method the trainer does not compile, or whose compiled run fails, shows "n/a" and says why.

Kernels per step (`fw_trainer.measurement.count_kernels`, the definition the tests use): one profiled `train()` call
per method and path after the timing, `--profile_steps` optimizer steps profiled after two unprofiled ones. On CUDA:
CUDA kernels executed (copies and memsets not counted). On CPU, where there are no kernel launches: the outermost
`aten::` operators that launch a kernel (an operator's own sub-calls, views and no-op copies are not counted) plus the
C++ kernels inductor generated (recorded because `torch._inductor.config.cpp.enable_kernel_profile` is set here).
"""

import os
import statistics
import sys
import time
from typing import Optional

import torch
from torch._dynamo.utils import get_compilation_metrics
from transformers import TrainerCallback

from fw_trainer import build_peft_model
from fw_trainer.measurement import CPU_PEAK_KIND, CUDA_PEAK_KIND, count_kernels, peak_memory_mb, reset_peak_memory


# The sibling modules, also when this file is imported by its path (the tests) rather than run.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import memory  # noqa: E402


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


class KernelCounter(TrainerCallback):
    """
    Profiles optimizer steps `first_step` to `first_step + num_steps − 1` of a `train()` call with `torch.profiler`
    and keeps the kernels per step (`fw_trainer.measurement.count_kernels`).

    Args:
        device (`torch.device`): The training device: CUDA kernels are counted on CUDA, operators on the CPU.
        first_step (`int`, *optional*, defaults to `3`): The first profiled step (1-based); earlier ones warm up.
        num_steps (`int`, *optional*, defaults to `1`): How many consecutive steps to profile.
    """

    def __init__(self, device: torch.device, first_step: int = 3, num_steps: int = 1):
        self.device, self.first_step, self.num_steps = device, first_step, num_steps
        self.kernels_per_step: Optional[float] = None
        self._profile = None

    def on_step_begin(self, args, state, control, **kwargs):
        # `global_step` counts the steps already taken: this is step `global_step + 1`.
        if state.global_step + 1 == self.first_step:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize(self.device)
            self._profile = torch.profiler.profile(activities=activities)
            self._profile.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._profile is not None and state.global_step == self.first_step + self.num_steps - 1:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # every kernel of the steps finished, so recorded
            self._profile.__exit__(None, None, None)
            self.kernels_per_step = count_kernels(self._profile, self.device.type) / self.num_steps
            self._profile = None


def fast_path_of(method: str, model, fw_args, dataset, args) -> dict:
    """
    One method on the fast path, from a reset Dynamo: compile warm-up, `--rounds` timed calls, one profiled call.
    Returns its step times, peak memory (CUDA), kernels per step and `common.dynamo_stats`; or a `note` saying why it
    has no fast figures.
    """
    device = torch.device(args.device)
    common.reset_dynamo()
    timer = StepTimer(device)
    try:
        for _ in range(max(1, args.warmup_rounds)):  # compiles: the first step of the first call
            trainer = common.make_trainer(model, fw_args, dataset, args, 2, fast=True)
            trainer.train()
        if not common.is_compiled(trainer):
            return {"note": "the trainer did not compile this method's model: no fast path"}
        warmed_up = len(get_compilation_metrics())
        if device.type == "cuda":
            reset_peak_memory(device)
        for _ in range(args.rounds):
            common.make_trainer(model, fw_args, dataset, args, args.steps + 1, callbacks=[timer], fast=True).train()
        peak_memory = peak_memory_mb(device)[0] if device.type == "cuda" else None
        counter = KernelCounter(device, first_step=3, num_steps=args.profile_steps)
        steps = 2 + args.profile_steps
        common.make_trainer(model, fw_args, dataset, args, steps, callbacks=[counter], fast=True).train()
    except Exception as error:  # noqa: BLE001 -- a method that cannot take the fast path is a result, not a crash
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        print(f"{method}: the fast path failed ({message[:300]})", flush=True)
        return {"note": f"fast path failed: {message[:500]}", **common.dynamo_stats()}
    figures = {
        "median_step_s": statistics.median(timer.times),
        "step_times_s": timer.times,
        "peak_memory_mb": peak_memory,
        "kernels_per_step": counter.kernels_per_step,
        **common.dynamo_stats(after=warmed_up),
    }
    if figures["graphs"] == 0:
        # A compiled model whose code Dynamo never traced, e.g. under `torch.compiler.set_stance("force_eager")`.
        figures["note"] = "Dynamo compiled no graph: the fast path's steps ran eagerly (its other switches applied)"
    return figures


def step_benchmark(args) -> dict:
    """Every method eager (interleaved, round by round), then on the fast path (method by method); the table."""
    device = torch.device(args.device)
    runs = {}
    for method in args.methods:
        fw_args = common.fw_arguments(method)
        model, _ = build_peft_model(common.build_model(args.model, args.config_overrides), fw_args)
        runs[method] = (model, fw_args, StepTimer(device))
    vocab_size = next(iter(runs.values()))[0].config.vocab_size
    dataset = common.RandomTokens(args.batch_size * (args.steps + 1), args.seq_len, vocab_size)
    peak_memory = dict.fromkeys(runs, 0.0)
    for _ in range(args.warmup_rounds):
        # Untimed: the first steps of a fresh model in a process are slow (allocator growth, lazy initialisation).
        for model, fw_args, _ in runs.values():
            common.make_trainer(model, fw_args, dataset, args, 2).train()
    for round_index in range(args.rounds):
        for method, (model, fw_args, timer) in runs.items():
            if device.type == "cuda":
                reset_peak_memory(device)
            common.make_trainer(model, fw_args, dataset, args, args.steps + 1, callbacks=[timer]).train()
            if device.type == "cuda":
                peak_memory[method] = max(peak_memory[method], peak_memory_mb(device)[0])
        print(f"eager round {round_index + 1}/{args.rounds} done", flush=True)
    kernels = {}
    for method, (model, fw_args, _) in runs.items():
        counter = KernelCounter(device, first_step=3, num_steps=args.profile_steps)
        common.make_trainer(model, fw_args, dataset, args, 2 + args.profile_steps, callbacks=[counter]).train()
        kernels[method] = counter.kernels_per_step
    memory_kind = CUDA_PEAK_KIND if device.type == "cuda" else CPU_PEAK_KIND
    if device.type == "cpu" and not args.no_memory:
        for method in runs:
            peak_memory[method], memory_kind = memory.peak_memory_of(method, args)
    medians = {method: statistics.median(timer.times) for method, (_, _, timer) in runs.items()}

    fast = {}
    if args.fast:
        for method, (model, fw_args, _) in runs.items():
            fast[method] = fast_path_of(method, model, fw_args, dataset, args)
            print(f"fast path {method} done", flush=True)
    fast_medians = {method: fast[method].get("median_step_s") for method in fast}
    reference = medians.get("lora")
    kernels_kind = "cuda_kernels" if device.type == "cuda" else "cpu_outermost_aten_ops_and_inductor_cpp_kernels"
    rows = []
    for method in runs:
        memory_mb = peak_memory.get(method) or None
        rows.append(
            {
                "method": method,
                "eager_ms": 1000 * medians[method],
                "eager_ratio_to_eager_lora": medians[method] / reference if reference else None,
                "fast_ms": 1000 * fast_medians[method] if fast_medians.get(method) else None,
                "fast_ratio_to_eager_lora": (
                    fast_medians[method] / reference if fast_medians.get(method) and reference else None
                ),
                "peak_memory_mb": memory_mb,
                "peak_memory_ratio_to_lora": (
                    memory_mb / peak_memory["lora"] if memory_mb and peak_memory.get("lora") else None
                ),
                "graph_breaks": fast[method].get("graph_breaks") if method in fast else None,
                "recompiles": fast[method].get("recompiles") if method in fast else None,
                "eager_kernels_per_step": kernels[method],
                "fast_kernels_per_step": fast[method].get("kernels_per_step") if method in fast else None,
            }
        )
    print_step_table(rows, device, args)
    for method, figures in fast.items():
        if "note" in figures:
            print(f"  {method}: {figures['note']}")
    return {
        "mode": "steps",
        "table": rows,
        "median_step_s": medians,
        "ratio_to_lora": common.ratios_to_lora(medians),
        "peak_memory_mb": peak_memory,
        "peak_memory_kind": memory_kind,
        "peak_memory_ratio_to_lora": common.ratios_to_lora(peak_memory),
        "step_times_s": {method: timer.times for method, (_, _, timer) in runs.items()},
        "kernels_per_step": kernels,
        "kernels_kind": kernels_kind,
        "fast_path": common.fast_path_settings(args) if args.fast else None,
        "fast_median_step_s": fast_medians if args.fast else None,
        "fast_ratio_to_eager_lora": common.ratios_to_lora(fast_medians, reference) if args.fast else None,
        "fast": fast if args.fast else None,
    }


def print_step_table(rows: list[dict], device: torch.device, args) -> None:
    what = "CUDA kernels" if device.type == "cuda" else "launched outermost aten ops + inductor C++ kernels"
    peak = "CUDA max allocated" if device.type == "cuda" else "process peak RSS, eager"
    print(f"\nms/step: median; x: ratio to eager lora; peak MB: {peak}; kernels/step: {what} per optimizer step")
    if args.fast:
        mode = args.compile_mode or "default"
        print(
            f"fast: torch_compile (backend {args.compile_backend}, mode {mode}), adamw_torch_fused, "
            "logging_nan_inf_filter off; graph breaks and recompiles: the fast path's"
        )
    header = (
        f"{'method':<22} {'eager ms':>9} {'x':>6} {'fast ms':>9} {'x':>6} {'peak MB':>8} {'x':>6} "
        f"{'breaks':>6} {'recomp':>6} {'kern eager':>10} {'kern fast':>10}"
    )
    common.print_header(header)
    cell, count = common.cell, common.count_cell
    for row in rows:
        print(
            f"{row['method']:<22} {cell(row['eager_ms'], 9, 1)} {cell(row['eager_ratio_to_eager_lora'], 6, 3)} "
            f"{cell(row['fast_ms'], 9, 1)} {cell(row['fast_ratio_to_eager_lora'], 6, 3)} "
            f"{cell(row['peak_memory_mb'], 8, 0)} {cell(row['peak_memory_ratio_to_lora'], 6, 3)} "
            f"{count(row['graph_breaks'])} {count(row['recompiles'])} {cell(row['eager_kernels_per_step'], 10, 0)} "
            f"{cell(row['fast_kernels_per_step'], 10, 0)}"
        )


def make_parser():
    parser = common.make_parser(__doc__, common.METHODS)
    parser.add_argument("--seq_len", type=int, default=128, help="Row length.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup_rounds", type=int, default=1, help="Untimed rounds of 2 steps per method first.")
    parser.add_argument("--steps", type=int, default=5, help="Timed optimizer steps per method and round.")
    parser.add_argument("--profile_steps", type=int, default=1, help="Profiled steps per method for kernels/step.")
    parser.add_argument("--no_memory", action="store_true", help="CPU: skip the per-method peak-memory processes.")
    common.add_fast_path_arguments(parser)
    return parser


def main():
    args = make_parser().parse_args()
    common.quiet()
    if args.fast and args.device == "cpu" and args.compile_backend == "inductor":
        # Inductor's C++ kernels call the profiler only when built with this: they count in kernels/step.
        from torch._inductor import config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    common.write_figures(step_benchmark(args), args)


if __name__ == "__main__":
    main()
