"""
Runs every cell of a study (see `fw_trainer.study.config`) with `run_glue_fw.py`, then aggregates the results.

    python -m fw_trainer.study.sweep configs/studies/cpu_minilm.yaml [--parallel N] [--dry_run]
    python -m fw_trainer.study.sweep configs/studies/roberta_base_glue.yaml --parallel 6 --runs_per_gpu 3  # 2 GPUs

Resumable: a finished run (its `run_complete.json` whole, see `fw_trainer.glue.completion`) with a whole
`metrics.json` is skipped, and a finished run whose `metrics.json` is missing or damaged gets it rewritten without
training again; a run that stopped with checkpoints resumes from the last one; a run that crashed before any
checkpoint starts again (its log is kept, appended to). Each run's output
goes to `<output_dir>/logs/<run>.log`; the screen shows which run, how many are left and the estimated time to go,
and at the end the runs per hour on the slot layout used, to compare one run per GPU with several.

`--runs_per_gpu K` puts up to K runs on each GPU (`fw_trainer/study/slots.py`), once they fit in its free memory:
by `--run_memory_gb`, or by the peak a finished run of the study measured; refused before anything starts when they
do not. With neither estimate, the sweep starts one run per GPU and opens the other slots, as many as fit, once the
first run has reported its peak.

Before the first run starts, every run's arguments go through the GLUE script's own parser
(`validation.refused_arguments`): a misspelt method or option is refused at once, naming the run, rather than when its
run comes up hours later. One sweep at a time runs a study (`study_lock.StudyDirectoryLock`): a second one on the same
output directory is refused at once.
"""

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import ExitStack
from typing import Optional

from ..checkpoints import last_complete_checkpoint
from ..errors import UsageError
from ..glue.arguments import to_argv
from ..glue.completion import is_finished_run
from ..glue.run import DIVERGED_EXIT_STATUS
from ..state_files import write_json_atomic
from .code_revision import code_revision
from .config import StudyConfig, StudyConfigError, StudyRun
from .run_metrics import METRICS_FILE, collect_run_metrics, read_run_metrics
from .slots import SlotLayout, fitting_runs_per_gpu, measured_peak_gb, plan_runs_per_gpu
from .study_lock import StudyDirectoryLock
from .validation import refused_arguments


def run_dir(config: StudyConfig, run: StudyRun) -> str:
    return os.path.join(config.output_dir, run.name)


def log_path(config: StudyConfig, run: StudyRun) -> str:
    return os.path.join(config.output_dir, "logs", run.name.replace("/", "__") + ".log")


def is_finished(config: StudyConfig, run: StudyRun) -> bool:
    """Whether `run` is done: a finished run ([`is_finished_run`]) whose `metrics.json` is whole (a run killed while
    its metrics were written gets them rewritten from its files, without training again)."""
    output_dir = run_dir(config, run)
    return is_finished_run(output_dir) and read_run_metrics(output_dir) is not None


def run_arguments(config: StudyConfig, run: StudyRun) -> list[str]:
    """The arguments of a run's command line (see [`run_command`]): the study's `base_config`, the run's arguments, its
    output directory, and `--overwrite_output_dir true` when an earlier attempt left nothing to resume from."""
    output_dir = run_dir(config, run)
    argv = [config.base_config] if config.base_config else []
    argv += to_argv(run.args) + ["--output_dir", output_dir]
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not is_finished_run(output_dir):
        if last_complete_checkpoint(output_dir) is None:
            # A crash before the first checkpoint left nothing to resume from (and no result): start again.
            argv += ["--overwrite_output_dir", "true"]
    return argv


def run_command(config: StudyConfig, run: StudyRun) -> list[str]:
    """The command line of a run, the installed GLUE runner's (`python -m fw_trainer.glue.run`, i.e. `run_glue_fw.py`)
    or the study's `script`, continuing what an earlier attempt left behind."""
    script = (config.script,) if config.script else ("-m", "fw_trainer.glue.run")
    return [sys.executable, *script, *run_arguments(config, run)]


class Sweep:
    """
    Runs the unfinished cells of a study, `parallel` at a time, and reports progress and runs per hour.

    Args:
        config (`StudyConfig`): The study.
        parallel (`int`): Runs at a time.
        max_retries (`int`): Extra attempts for a run that fails.
        runs_per_gpu (`int`): The most runs on one GPU (see [`SlotLayout`]); several only once they fit in memory.
        run_memory_gb (`float`, *optional*): One run's peak GPU memory, in GiB, for that check; by default what the
            study's finished runs measured, or else what the first run measures (one run per GPU until then).

    Raises:
        `StudyConfigError`: If `parallel` needs more GPUs than are visible, or the runs per GPU do not fit.
    """

    def __init__(
        self,
        config: StudyConfig,
        parallel: int = 1,
        max_retries: int = 1,
        runs_per_gpu: int = 1,
        run_memory_gb: Optional[float] = None,
    ):
        self.config = config
        self.parallel = parallel
        self.max_retries = max_retries
        self.layout = SlotLayout.plan(parallel, runs_per_gpu)
        run_dirs = [run_dir(config, run) for run in config.runs()]
        self._memory, self.runs_per_gpu, self.memory_report = plan_runs_per_gpu(self.layout, run_dirs, run_memory_gb)
        # Waiting for a run's measured peak before putting more runs on a GPU.
        self._measuring = self.runs_per_gpu < self.layout.runs_per_gpu
        self._processes: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._durations: list[float] = []
        self._stopping = False
        # The code every run of this sweep starts on: in each log's header and in each `metrics.json`.
        self.code = code_revision()

    def describe(self) -> list[str]:
        """The slot layout and the memory check, as printed before the runs start."""
        return [f"Slots: {self.layout.describe(self.runs_per_gpu)}"] + self.memory_report

    def run(self) -> list[StudyRun]:
        """Runs what is left; returns the runs that still failed after their retries."""
        runs = self.config.runs()
        todo = [run for run in runs if not is_finished(self.config, run)]
        print(
            f"Study {self.config.path}: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to "
            f"run. Logs: {os.path.join(self.config.output_dir, 'logs')}",
            *self.describe(),
            sep="\n",
            flush=True,
        )
        failed, start = [], time.time()
        with ThreadPoolExecutor(self.parallel) as pool:
            try:
                failed = self._run_all(todo, pool)
            except KeyboardInterrupt:
                # Before the pool waits for its workers, which wait for their runs.
                self.terminate()
                raise
        hours, finished = (time.time() - start) / 3600, len(todo) - len(failed)
        # Runs per hour of wall time with the layout they ran on: two sweeps, one and several runs per GPU, compare.
        print(
            f"Sweep done in {hours * 60:.1f} min ({hours:.2f} h): {finished} ran, {len(failed)} failed: "
            f"{finished / max(hours, 1e-9):.1f} runs/h on {self.layout.describe(self.runs_per_gpu)}."
        )
        return failed

    def _run_all(self, todo: list[StudyRun], pool: ThreadPoolExecutor) -> list[StudyRun]:
        slots = self.layout.environments
        free_slots = list(range(self.layout.slots(self.runs_per_gpu)))
        queue, pending, failed = list(todo), {}, []
        while queue or pending:
            while queue and free_slots:
                run, slot = queue.pop(0), free_slots.pop(0)
                pending[pool.submit(self._run_with_retries, run, slots[slot])] = (run, slot)
                print(
                    f"[{len(todo) - len(queue)}/{len(todo)}] start {run.name}  ({len(queue)} queued, "
                    f"{self._eta(len(queue) + len(pending))})",
                    flush=True,
                )
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                run, slot = pending.pop(future)
                free_slots.append(slot)
                ok, seconds = future.result()
                if not ok:
                    failed.append(run)
                status = "finished" if ok else f"FAILED (see {log_path(self.config, run)})"
                print(f"    {run.name}: {status} in {seconds / 60:.1f} min", flush=True)
                if ok and self._measuring:
                    free_slots += self._open_slots_if_they_fit(run)
        return failed

    def _open_slots_if_they_fit(self, run: StudyRun) -> list[int]:
        """Once a run has measured its peak GPU memory: the slots that fit beside the one run per GPU so far."""
        peak = measured_peak_gb([run_dir(self.config, run)])
        if peak is None:  # a run on the CPU (`--use_cpu`) measures no GPU memory: wait for another
            return []
        self._measuring = False
        fitting, lines = fitting_runs_per_gpu(self.layout, self._memory, peak, f"as measured by {run.name}")
        opened = range(self.layout.slots(self.runs_per_gpu), self.layout.slots(max(1, fitting)))
        self.runs_per_gpu = max(1, fitting)
        print(*lines, f"-> {self.layout.describe(self.runs_per_gpu)}", sep="\n", flush=True)
        return list(opened)

    def _eta(self, remaining: int) -> str:
        if not self._durations:
            return "ETA after the first run"
        mean = sum(self._durations) / len(self._durations)
        return f"ETA {remaining * mean / self.layout.slots(self.runs_per_gpu) / 60:.0f} min"

    def _run_with_retries(self, run: StudyRun, environment: dict[str, str]) -> tuple[bool, float]:
        start = time.time()
        for _ in range(1 + self.max_retries):
            if self._stopping:
                break
            returncode = self._run_once(run, environment)
            if returncode == 0:
                seconds = time.time() - start
                with self._lock:
                    self._durations.append(seconds)
                return True, seconds
            if returncode == DIVERGED_EXIT_STATUS:
                break  # the same run diverges again: failed, not retried
        return False, time.time() - start

    def _run_once(self, run: StudyRun, environment: dict[str, str]) -> int:
        """Runs `run` (unless it finished before) and writes its `metrics.json`; returns the run's exit status."""
        output_dir = run_dir(self.config, run)
        if not is_finished_run(output_dir):
            command = run_command(self.config, run)
            log = log_path(self.config, run)
            os.makedirs(os.path.dirname(log), exist_ok=True)
            with open(log, "a", encoding="utf-8") as log_file:
                log_file.write(
                    f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} code {self.code} {shlex.join(command)}\n"
                )
                log_file.flush()
                env = {**os.environ, "PYTHONUNBUFFERED": "1", **environment}
                process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
                with self._lock:
                    self._processes.add(process)
                returncode = process.wait()
                with self._lock:
                    self._processes.discard(process)
            if returncode != 0:
                return returncode
        task_name = run.args.get("task_name")
        extra = {"run": run.name, "labels": run.labels, "args": run.args, "code": self.code}
        try:
            metrics = collect_run_metrics(output_dir, task_name, extra)
        except FileNotFoundError as error:  # finished, but with no results to collect: a failed run, said in its log
            with open(log_path(self.config, run), "a", encoding="utf-8") as log_file:
                log_file.write(f"\n===== no metrics: {error}\n")
            return 1
        write_json_atomic(os.path.join(output_dir, METRICS_FILE), metrics)
        return 0

    def terminate(self) -> None:
        """Stops the runs in flight (they resume from their last checkpoint, or start again, next time)."""
        self._stopping = True
        with self._lock:
            for process in self._processes:
                process.terminate()
        for process in list(self._processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fw_trainer.study.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", help="The study YAML file (see fw_trainer/study/config.py).")
    parser.add_argument("--parallel", type=int, default=1, help="Runs at a time: on the GPUs, or a share of CPUs.")
    parser.add_argument(
        "--runs_per_gpu",
        type=int,
        default=1,
        help="The most runs on one GPU (slots go round-robin over the GPUs); several only if they fit in its memory.",
    )
    parser.add_argument(
        "--run_memory_gb",
        type=float,
        default=None,
        help="One run's peak GPU memory in GiB, to check --runs_per_gpu against (default: a finished run's measured "
        "peak, or else the first run's).",
    )
    parser.add_argument("--max_retries", type=int, default=1, help="Extra attempts for a run that fails.")
    parser.add_argument(
        "--dry_run", action="store_true", help="Print each run's command and state, the slots and the memory check."
    )
    parser.add_argument("--no_aggregate", action="store_true", help="Skip the aggregation after the sweep.")
    args = parser.parse_args(argv)
    with ExitStack() as held:
        try:
            if args.parallel < 1 or args.runs_per_gpu < 1 or args.max_retries < 0:
                raise StudyConfigError(
                    "--parallel and --runs_per_gpu must be at least 1 and --max_retries at least 0."
                )
            if args.run_memory_gb is not None and args.run_memory_gb <= 0:
                raise StudyConfigError(
                    f"--run_memory_gb should be a positive number of GiB, not {args.run_memory_gb}."
                )
            config = StudyConfig.from_yaml(args.study)
            refused = refused_arguments(config, [run_arguments(config, run) for run in config.runs()])
            if args.dry_run:
                for run in config.runs():
                    state = "finished" if is_finished(config, run) else "to run"
                    print(f"{run.name} [{state}]: {shlex.join(run_command(config, run))}")
            if refused is not None:
                raise StudyConfigError(refused)
            if not args.dry_run:
                # The study is this sweep's until it ends, aggregation included. Taken before the memory check, which
                # another sweep's runs would fail (a refusal leaves nothing behind: see `StudyDirectoryLock`).
                held.enter_context(StudyDirectoryLock(config.output_dir))
            sweep = Sweep(
                config,
                parallel=args.parallel,
                max_retries=args.max_retries,
                runs_per_gpu=args.runs_per_gpu,
                run_memory_gb=args.run_memory_gb,
            )
            if args.dry_run:
                print(*sweep.describe(), sep="\n")
                return 0
        except (StudyConfigError, UsageError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

        # A `kill` stops the runs in flight too, as Ctrl-C does, instead of leaving them orphaned.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            failed = sweep.run()
        except KeyboardInterrupt:
            print(
                "\nInterrupted: the runs in flight were stopped; rerun the same command to continue.", file=sys.stderr
            )
            return 130
        if failed:
            print(
                f"error: {len(failed)} run(s) failed: {', '.join(run.name for run in failed)}. Read their logs, fix "
                "the cause and rerun the same command: finished runs are kept.",
                file=sys.stderr,
            )
            return 1
        if not args.no_aggregate:
            from .aggregate import aggregate_study

            aggregate_study(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
