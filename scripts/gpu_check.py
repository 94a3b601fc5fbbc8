"""The GPU check (`make gpu-check`): everything CI cannot run, on a machine with a CUDA GPU, in one command.

1. The test suite with the `gpu` tests, which must run (`FW_REQUIRE_GPU=1` turns a skip for want of CUDA into a
   failure).
2. The commands our users type, end to end, with the embedded all-MiniLM-L6-v2 on SST-2 (`GLUE_DIR`, else the Hub),
   short: `run_glue_fw.py --bf16` for every method and estimator, one `--fp16` run, and one run through
   `accelerate launch --config_file configs/accelerate_single_gpu.yaml`. Each run is checked for its artefacts: the
   results (finite, a dev accuracy that shows learning, CUDA peak memory), the frozen importances, the adapter (or the
   fully fine-tuned model) reloaded with `PeftModel.from_pretrained` and predicting what the run predicted, and the
   TensorBoard scalars read back with TensorBoard's reader.
3. `benchmarks/steps.py --device cuda --bf16` (the step benchmark).

It goes on after a failure, prints one table, writes `gpu_check.json` into `--output_dir`, and exits 1 if anything
failed. Usage:

    make gpu-check                                   # = python scripts/gpu_check.py
    python scripts/gpu_check.py --skip_tests --max_steps 200
"""

import argparse
import csv
import glob
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fw_trainer.arguments import FISHER_WEIGHTED_METHODS  # noqa: E402  (from the checkout, as the runs use it)


# name → (launcher, method, extra arguments, lowest acceptable dev accuracy or None).
# The accuracy floors are far below what these runs reach (MiniLM: ~0.86 after 600 steps) and far above chance: they
# catch a run that trains on garbage. AdaLoRA learns slowly at LoRA's learning rate (see results/), so it only has to
# finish with finite numbers.
RUNS = {
    "lora": ("python", "lora", ["--bf16"], 0.7),
    "fw_lora": ("python", "fw_lora", ["--bf16"], 0.7),
    "fw_lora_sketch": ("python", "fw_lora", ["--bf16", "--fw_estimator", "sketch"], 0.7),
    "iw_lora": ("python", "iw_lora", ["--bf16"], 0.7),
    "adalora": ("python", "adalora", ["--bf16"], None),
    "full": ("python", "full", ["--bf16", "--learning_rate", "5e-5"], 0.7),
    "fw_lora_fp16": ("python", "fw_lora", ["--fp16"], 0.7),
    "fw_lora_accelerate": ("accelerate", "fw_lora", [], 0.7),  # bf16 from the accelerate config
}


def run_command(command: list[str], log_path: Path, env: Optional[dict] = None) -> tuple[int, float]:
    """Runs `command` with its output teed into `log_path`; returns its exit status and wall time."""
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        for line in process.stdout:
            log.write(line)
            sys.stdout.write(line)
        returncode = process.wait()
    return returncode, time.perf_counter() - start


def run_glue_command(name: str, output_dir: Path, max_steps: int, warmup_steps: int, use_cpu: bool) -> list[str]:
    launcher, method, extra, _ = RUNS[name]
    prefix = [sys.executable]
    if launcher == "accelerate":
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        prefix.append(str(ROOT / "configs" / "accelerate_single_gpu.yaml"))
    arguments = [
        "run_glue_fw.py", "--task_name", "sst2", "--method", method, "--do_train", "--do_eval",
        "--max_steps", str(max_steps), "--fw_warmup_steps", str(warmup_steps), "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "128",
        "--logging_steps", str(max(1, min(25, max_steps // 4))),
        "--save_strategy", "no", "--seed", "0", "--report_to", "tensorboard", "--output_dir", str(output_dir),
        "--overwrite_output_dir", *extra,
    ]  # fmt: skip
    if use_cpu:
        arguments = [a for a in arguments if a not in ("--bf16", "--fp16")] + ["--use_cpu"]
    return prefix + arguments


def check_run(output_dir: Path, method: str, min_accuracy: Optional[float], device: str) -> list[str]:
    """The artefacts of one `run_glue_fw.py` SST-2 run; returns what is wrong with them (empty if nothing)."""
    failures = []
    results_path = output_dir / "all_results.json"
    if not results_path.is_file():
        return [f"no {results_path.name}"]
    results = json.loads(results_path.read_text())
    accuracy, train_loss = results.get("eval_accuracy", float("nan")), results.get("train_loss", float("nan"))
    if not (math.isfinite(accuracy) and math.isfinite(train_loss)):
        failures.append(f"non-finite results: eval_accuracy {accuracy}, train_loss {train_loss}")
    elif min_accuracy is not None and accuracy < min_accuracy:
        failures.append(f"eval_accuracy {accuracy:.4f} below {min_accuracy}")
    expected_kind = "cuda_max_memory_allocated" if device == "cuda" else "cpu_max_rss"
    if results.get("train_peak_memory_kind") != expected_kind or not results.get("train_peak_memory_mb", 0) > 0:
        failures.append(
            f"peak memory {results.get('train_peak_memory_mb')} MB of kind {results.get('train_peak_memory_kind')}, "
            f"expected a positive {expected_kind}"
        )
    if method in FISHER_WEIGHTED_METHODS:
        failures += check_importances(output_dir)
    failures += check_reload(output_dir, method)
    failures += check_tensorboard(output_dir, method)
    return failures


def check_importances(output_dir: Path) -> list[str]:
    path = output_dir / "fw_importance.json"
    if not path.is_file():
        return ["no fw_importance.json"]
    saved = json.loads(path.read_text())
    rows = list(saved["modules"].values())
    values = [row[key] for row in rows for key in ("fisher", "importance")]
    if not saved["frozen"] or any(value is None or not math.isfinite(value) for value in values):
        return ["fw_importance.json: importances not frozen or not finite"]
    if saved["normalization"] == "sum" and abs(sum(row["importance"] for row in rows) - 1) > 1e-4:
        return ["fw_importance.json: importances do not sum to 1"]
    return []


def check_reload(output_dir: Path, method: str, num_sentences: int = 256) -> list[str]:
    """Reloads the saved adapter with `PeftModel.from_pretrained` (the saved model for `full`) in fp32 and compares its
    predictions on the first dev sentences with those the run wrote."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    predictions_path = output_dir / "eval_predictions_sst2.tsv"
    if not predictions_path.is_file():
        return ["no eval_predictions_sst2.tsv"]
    with open(predictions_path, encoding="utf-8") as f:
        saved = [int(row["prediction"]) for row in csv.DictReader(f, delimiter="\t")][:num_sentences]
    try:
        if method == "full":
            model = AutoModelForSequenceClassification.from_pretrained(output_dir)
        else:
            from peft import PeftConfig, PeftModel

            # The base model as the adapter's own config names it.
            base_path = PeftConfig.from_pretrained(output_dir).base_model_name_or_path
            base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
            model = PeftModel.from_pretrained(base, output_dir)
    except Exception as error:  # noqa: BLE001 - any failure to reload is what this check reports
        return [f"the saved model does not reload: {type(error).__name__}: {error}"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    sentences = dev_sentences()[: len(saved)]
    predictions = []
    with torch.no_grad():
        for start in range(0, len(sentences), 64):
            batch = tokenizer(sentences[start : start + 64], padding=True, truncation=True, return_tensors="pt")
            predictions += model(**batch.to(device)).logits.argmax(-1).tolist()
    # The run evaluated in bf16/fp16, the reload in fp32: a sentence on the decision boundary may flip.
    agreement = sum(a == b for a, b in zip(predictions, saved)) / len(saved)
    return [] if agreement >= 0.98 else [f"the reloaded model agrees with the run's predictions on {agreement:.1%}"]


def dev_sentences() -> list[str]:
    from fw_trainer.glue.tsv_layout import glue_dir_from_env, load_glue_dir

    glue_dir = glue_dir_from_env()
    if glue_dir:
        return list(load_glue_dir(glue_dir, "sst2")["validation"]["sentence"])
    from datasets import load_dataset

    return list(load_dataset("nyu-mll/glue", "sst2", split="validation")["sentence"])


def check_tensorboard(output_dir: Path, method: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = glob.glob(str(output_dir / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    if not event_files:
        return ["no TensorBoard event file"]
    accumulator = EventAccumulator(os.path.dirname(event_files[0]))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    expected = {"train/loss", "train/task_loss", "train/learning_rate", "eval/accuracy"}
    if method in FISHER_WEIGHTED_METHODS:
        expected |= {"train/fw_penalty"}
    if method == "adalora":
        expected |= {"train/adalora_total_rank"}
    missing = sorted(expected - tags)
    if missing:
        return [f"TensorBoard scalars missing: {', '.join(missing)}"]
    losses = [event.value for event in accumulator.Scalars("train/loss")]
    return [] if all(math.isfinite(value) for value in losses) else ["non-finite train/loss in TensorBoard"]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/gpu-check")
    parser.add_argument("--max_steps", type=int, default=300, help="Optimizer steps of each run.")
    parser.add_argument("--warmup_steps", type=int, default=100, help="FW-LoRA's K (IW-LoRA's calibration steps).")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--skip_tests", action="store_true")
    parser.add_argument("--skip_benchmark", action="store_true")
    parser.add_argument(
        "--accuracy_floor",
        type=float,
        default=None,
        help="Replace every run's lowest acceptable dev accuracy (0 disables them; the defaults assume >= 200 steps).",
    )
    parser.add_argument("--use_cpu", action="store_true", help="Smoke-test this script on a CPU (no GPU checks).")
    args = parser.parse_args(argv)

    import torch

    device = "cpu" if args.use_cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: the GPU check needs CUDA, and torch sees no GPU here (`--use_cpu` smoke-tests the script).")
        return 2
    output_dir = (ROOT / args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FW_REQUIRE_GPU": "0" if args.use_cpu else "1"}
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    checks = []

    if not args.skip_tests:
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]
        returncode, seconds = run_command(command, output_dir / "tests.log", env)
        checks.append({"check": "pytest (default suite + gpu)", "seconds": seconds, "failures": [] if returncode == 0
                       else [f"pytest exited {returncode}: see tests.log"]})  # fmt: skip

    for name in args.runs:
        run_dir = output_dir / name
        command = run_glue_command(name, run_dir, args.max_steps, args.warmup_steps, args.use_cpu)
        returncode, seconds = run_command(command, output_dir / f"{name}.log", env)
        failures = [f"exited {returncode}: see {name}.log"] if returncode != 0 else []
        if returncode == 0:
            floor = RUNS[name][3] if args.accuracy_floor is None else args.accuracy_floor
            failures = check_run(run_dir, RUNS[name][1], floor, device)
        results = json.loads((run_dir / "all_results.json").read_text()) if returncode == 0 else {}
        checks.append(
            {
                "check": f"run_glue_fw {name}",
                "seconds": seconds,
                "failures": failures,
                "eval_accuracy": results.get("eval_accuracy"),
                "train_steps_per_second": results.get("train_steps_per_second"),
                "train_peak_memory_mb": results.get("train_peak_memory_mb"),
            }
        )

    if not args.skip_benchmark:
        command = [sys.executable, "benchmarks/steps.py", "--device", device, "--output"]
        command += [str(output_dir / "benchmark.json"), *(["--bf16"] if device == "cuda" else ["--no_memory"])]
        returncode, seconds = run_command(command, output_dir / "benchmark.log", env)
        checks.append({"check": "benchmarks/steps.py --bf16", "seconds": seconds, "failures": [] if returncode == 0
                       else [f"exited {returncode}: see benchmark.log"]})  # fmt: skip

    report["checks"] = checks
    (output_dir / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"\nGPU check on {report['device']} (torch {report['torch']}), logs in {output_dir}")
    print(f"{'check':<32} {'result':<6} {'s':>7} {'dev acc':>8} {'steps/s':>8} {'peak MB':>8}")
    for check in checks:
        values = [check.get(key) for key in ("eval_accuracy", "train_steps_per_second", "train_peak_memory_mb")]
        cells = ["" if value is None else f"{value:.4g}" for value in values]
        result = "FAIL" if check["failures"] else "ok"
        print(f"{check['check']:<32} {result:<6} {check['seconds']:>7.1f} {cells[0]:>8} {cells[1]:>8} {cells[2]:>8}")
        for failure in check["failures"]:
            print(f"    - {failure}")
    failed = sum(bool(check["failures"]) for check in checks)
    print(f"{failed} of {len(checks)} checks failed" if failed else f"all {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
