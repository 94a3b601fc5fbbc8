"""The benchmarks (`benchmarks/<mode>.py`) end to end on a tiny RoBERTa on the CPU: every column of their tables comes
out, with sane values (the figures themselves are the benchmarks' business, not the tests'). Each script runs in a
subprocess: it silences logging and warnings process-wide, and Dynamo's caches and counters are per process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = "hidden_size=32,num_hidden_layers=1,num_attention_heads=4,intermediate_size=48,vocab_size=100"


def run_benchmark(tmp_path: Path, mode: str, *flags: str) -> dict:
    """`benchmarks/<mode>.py` on the CPU with the tiny model at batch 4, and `flags`; its figures."""
    output = tmp_path / f"{mode}.json"
    command = [sys.executable, str(BENCHMARKS / f"{mode}.py"), "--device", "cpu", "--config_overrides", TINY]
    command += ["--batch_size", "4", "--output", str(output), *flags]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(output.read_text())


def test_step_benchmark_reports_every_column_eager_and_fast(tmp_path):
    figures = run_benchmark(
        tmp_path,
        "steps",
        *("--compile_backend", "aot_eager"),  # compiles in seconds, unlike inductor
        *("--methods", "lora", "fw_lora_warmup", "--rounds", "1", "--steps", "2", "--warmup_rounds", "0"),
        *("--seq_len", "16", "--no_memory"),
    )
    assert figures["kernels_kind"] == "cpu_outermost_aten_ops_and_inductor_cpp_kernels"
    assert figures["fast_path"]["torch_compile_backend"] == "aot_eager"
    assert figures["fast_path"]["optim"] == "adamw_torch_fused"
    rows = {row["method"]: row for row in figures["table"]}
    assert list(rows) == ["lora", "fw_lora_warmup"]
    assert rows["lora"]["eager_ratio_to_eager_lora"] == 1.0
    for row in rows.values():
        assert row["eager_ms"] > 0 and row["fast_ms"] > 0
        assert row["eager_ratio_to_eager_lora"] > 0 and row["fast_ratio_to_eager_lora"] > 0
        assert isinstance(row["graph_breaks"], int) and row["graph_breaks"] >= 0
        assert isinstance(row["recompiles"], int) and row["recompiles"] >= 0
        assert row["eager_kernels_per_step"] > 0 and row["fast_kernels_per_step"] > 0
        assert "peak_memory_mb" in row and "peak_memory_ratio_to_lora" in row  # `None` with --no_memory
    # Plain LoRA compiles into one graph, and nothing is recompiled (the model's own `problem_type` is preset).
    lora = figures["fast"]["lora"]
    assert (lora["graph_breaks"], lora["graphs"], lora["recompiles"]) == (0, 1, 0)
    assert lora["compile_s"] > 0
    assert set(figures["fast"]["fw_lora_warmup"]) >= {"graph_break_reasons", "recompiles_after_warmup", "step_times_s"}


@pytest.mark.slow
def test_whole_run_reports_seconds_per_method_eager_and_fast(tmp_path):
    figures = run_benchmark(
        tmp_path,
        "whole_runs",
        *("--compile_backend", "aot_eager", "--methods", "lora", "fw_lora", "--rounds", "1"),
        *("--run_steps", "8", "--run_warmup_steps", "3"),
    )
    assert figures["lengths"] == "sst2_train_lengths.json"
    for key in ("median_run_s", "fast_median_run_s"):
        assert set(figures[key]) == {"lora", "fw_lora"} and all(s > 0 for s in figures[key].values())
    assert figures["ratio_to_lora"]["lora"] == 1.0 and figures["fast_ratio_to_lora"]["lora"] == 1.0
    assert figures["fast_ratio_to_eager_lora"]["fw_lora"] > 0
    for stats in figures["fast"].values():
        assert stats["graph_breaks"] >= 0 and stats["recompiles"] >= 0 and stats["recompiles_after_warmup"] >= 0


def test_penalty_ops_fused_path_has_no_autograd_accumulation(tmp_path):
    output = tmp_path / "penalty.json"
    # Four layers: 24 matrices of 3 shapes, where autograd's per-matrix costs outgrow the fused path's per-shape ones.
    config = TINY.replace("num_hidden_layers=1", "num_hidden_layers=4")
    script = str(BENCHMARKS / "penalty_ops.py")
    command = [sys.executable, script, "--config_overrides", config, "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    figures = json.loads(output.read_text())
    assert figures["autograd"]["gradient_accumulation"] == figures["lora_parameters"]
    assert figures["fused"]["gradient_accumulation"] == 0
    assert figures["fused"]["aten_ops"] < figures["autograd"]["aten_ops"] < figures["per_matrix_loop"]["aten_ops"]


def test_memory_reports_a_fresh_process_peak_per_method(tmp_path):
    figures = run_benchmark(tmp_path, "memory", "--methods", "lora", "fw_lora", "--steps", "1", "--seq_len", "16")
    assert figures["mode"] == "memory" and figures["peak_memory_kind"] == "cpu_max_rss"
    assert set(figures["peak_memory_mb"]) == {"lora", "fw_lora"} and all(figures["peak_memory_mb"].values())
    assert figures["peak_memory_ratio_to_lora"]["lora"] == 1.0


def test_lengths_file_is_the_sst2_training_set():
    benchmark = load_script(BENCHMARKS / "common.py")
    with open(benchmark.LENGTHS_FILE) as f:
        document = json.load(f)
    histogram = benchmark.read_lengths(benchmark.LENGTHS_FILE)
    assert document["sentences"] == sum(histogram.values()) == 67349
    assert (min(histogram), max(histogram)) == (document["min"], document["max"])
    assert {"tokenizer", "date", "source", "note"} <= set(document)


def test_rows_take_histogram_lengths_and_batches_pad_to_a_multiple():
    benchmark = load_script(BENCHMARKS / "common.py")
    dataset = benchmark.RandomTokensOfLengths(400, {3: 1, 10: 3}, vocab_size=50, seed=0)
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert set(lengths) == {3, 10}
    assert 0.6 < lengths.count(10) / len(lengths) < 0.9  # drawn 3 : 1
    assert torch.equal(dataset[7]["input_ids"], dataset[7]["input_ids"])  # each row made from its index

    collate = benchmark.padding_collator(pad_token_id=1, pad_to_multiple_of=8)
    rows = [{"input_ids": torch.full((n,), 7), "labels": torch.tensor(n % 2)} for n in (3, 10)]
    batch = collate(rows)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 16)
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 10]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 1).all()
    assert batch["labels"].tolist() == [1, 0]
    # Right-padded, the tokens kept: the batch a hand-written padding gives.
    expected = torch.tensor([[7] * 3 + [1] * 13, [7] * 10 + [1] * 6])
    assert torch.equal(batch["input_ids"], expected) and torch.equal(batch["attention_mask"], (expected == 7).long())
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["labels"].dtype == torch.long
