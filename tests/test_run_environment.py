"""The size of a run's saved weights and the hardware it ran on: measured against the files' sizes on disk, written by
the GLUE script's writer, and read back into the study's tables (where runs that predate them aggregate as before)."""

import json
from pathlib import Path
from typing import Optional

import pytest
import torch
from conftest import tiny_roberta
from peft import LoraConfig, get_peft_model
from test_aggregate import fabricate_run

from fw_trainer.glue.run_directory import clear_previous_run
from fw_trainer.run_environment import RUN_ENVIRONMENT_FILE, adapter_file_bytes, hardware, write_run_environment
from fw_trainer.study.aggregate import aggregate_groups, markdown_tables
from fw_trainer.study.run_metrics import collect_run_metrics


RESULTS = Path(__file__).resolve().parents[1] / "results"
# The files a directory holds (name → bytes) and those whose sizes count.
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
PICKLED_SHARDS = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
WEIGHTS_CASES = [
    ("adapter", {"adapter_model.safetensors": 30, "adapter_config.json": 4}, ["adapter_model.safetensors"]),
    ("adapter over model", {"adapter_model.safetensors": 30, "model.safetensors": 100}, ["adapter_model.safetensors"]),
    ("pickled adapter", {"adapter_model.bin": 9, "config.json": 5}, ["adapter_model.bin"]),
    ("full", {"model.safetensors": 100, "config.json": 5}, ["model.safetensors"]),
    ("shards", {SHARDS[0]: 100, SHARDS[1]: 50, "model.safetensors.index.json": 10}, SHARDS),
    ("safetensors over pickle", {"model.safetensors": 100, "pytorch_model.bin": 120}, ["model.safetensors"]),
    (
        "pickled shards",
        {PICKLED_SHARDS[0]: 7, PICKLED_SHARDS[1]: 8, "pytorch_model.bin.index.json": 2},
        PICKLED_SHARDS,
    ),
    ("none", {"config.json": 5, "all_results.json": 2}, []),
]
HARDWARE_TYPES = {
    "device_type": str,
    "device_name": str,
    "accelerator_count": int,
    "cpu_name": str,
    "cpu_threads": int,
    "torch": str,
    "transformers": str,
    "peft": str,
    "fw-lora": str,
}


def test_adapter_file_bytes_of_a_saved_peft_adapter(tmp_path):
    config = LoraConfig(r=4, target_modules=["query", "value"])
    get_peft_model(tiny_roberta(), config).save_pretrained(str(tmp_path))
    assert adapter_file_bytes(str(tmp_path)) == (tmp_path / "adapter_model.safetensors").stat().st_size > 0


@pytest.mark.parametrize("case, files, counted", WEIGHTS_CASES, ids=[case[0] for case in WEIGHTS_CASES])
def test_adapter_file_bytes_counts_the_weights_of_one_kind(tmp_path, case, files, counted):
    directory = tmp_path / "run [seed*1]"  # a name glob would misread
    directory.mkdir()
    for name, size in files.items():
        (directory / name).write_bytes(b"\0" * size)
    expected = sum((directory / name).stat().st_size for name in counted) if counted else None
    assert adapter_file_bytes(str(directory)) == expected


def test_hardware_on_the_cpu():
    found = hardware("cpu")
    assert {key: type(value) for key, value in found.items()} == HARDWARE_TYPES
    assert found["device_type"] == "cpu" and found["device_name"] == found["cpu_name"] != ""
    assert found["cpu_threads"] == torch.get_num_threads() >= 1
    assert found["torch"] == torch.__version__
    assert hardware(torch.device("cpu")) == found
    json.dumps(found)  # recorded as JSON


@pytest.mark.gpu
def test_hardware_on_a_gpu():
    found = hardware()
    assert found["device_type"] == "cuda"
    assert found["device_name"] == torch.cuda.get_device_name(0) != found["cpu_name"]
    assert found["accelerator_count"] == torch.cuda.device_count() >= 1


def test_the_glue_script_writer_and_overwrite(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\0" * 123)
    write_run_environment(str(tmp_path), torch.device("cpu"), world_size=2)
    written = json.loads((tmp_path / RUN_ENVIRONMENT_FILE).read_text())
    assert written == {"adapter_file_bytes": 123, "hardware": hardware("cpu"), "world_size": 2}
    # A file of the run: `--overwrite_output_dir` removes it with the others.
    assert clear_previous_run(str(tmp_path)) == [] and not (tmp_path / RUN_ENVIRONMENT_FILE).exists()


def runs(tmp_path, devices: Optional[dict[str, str]] = None) -> list[dict]:
    """The `metrics.json` of LoRA and FW-LoRA on seeds 0 and 1; a method named in `devices` records its
    `run_environment.json` (an adapter of 2 MiB for LoRA, 3 MiB for FW-LoRA, trained on the device named)."""
    collected = []
    for method in ("lora", "fw"):
        for seed in (0, 1):
            run_dir = tmp_path / method / f"seed{seed}"
            fabricate_run(run_dir, method, seed)
            if method in (devices or {}):
                environment = {
                    "adapter_file_bytes": (2 if method == "lora" else 3) * 2**20,
                    "hardware": {**hardware("cpu"), "device_name": devices[method]},
                    "world_size": 1,
                }
                (run_dir / RUN_ENVIRONMENT_FILE).write_text(json.dumps(environment))
            labels = {"method": method, "seed": str(seed)}
            extra = {"run": f"{method}/seed{seed}", "labels": labels, "args": {"method": method}}
            collected.append(collect_run_metrics(str(run_dir), "sst2", extra))
    return collected


def test_the_study_reads_and_tables_the_file_size_and_the_hardware(tmp_path):
    collected = runs(tmp_path, {"lora": "NVIDIA H200", "fw": "NVIDIA H200"})
    assert collected[0]["adapter_file_bytes"] == 2 * 2**20 and collected[0]["hardware"]["device_name"] == "NVIDIA H200"
    groups = aggregate_groups(collected)
    assert [(g["name"], g["adapter_file_bytes"], g["hardware"]) for g in groups] == [
        ("lora", 2 * 2**20, ["NVIDIA H200"]),
        ("fw", 3 * 2**20, ["NVIDIA H200"]),
    ]
    lines = markdown_tables(groups, []).splitlines()
    # One device for the whole table: said once, above it.
    assert lines[0] == "Hardware: NVIDIA H200."
    assert lines[2].endswith("| adapter params | adapter file (MB) |") and lines[3].count("---") == 10
    assert lines[4].endswith("| 1,234 | 2.00 |") and lines[5].endswith("| 1,234 | 3.00 |")


def test_cells_on_different_hardware_get_a_column(tmp_path):
    groups = aggregate_groups(runs(tmp_path, {"lora": "NVIDIA H200", "fw": "NVIDIA A100"}))
    lines = markdown_tables(groups, []).splitlines()
    assert lines[0].endswith("| adapter file (MB) | hardware |") and lines[1].count("---") == 11
    assert lines[2].endswith("| 2.00 | NVIDIA H200 |") and lines[3].endswith("| 3.00 | NVIDIA A100 |")


def test_runs_that_predate_the_file_aggregate_as_before(tmp_path):
    collected = runs(tmp_path)
    assert all(m["adapter_file_bytes"] is None and m["hardware"] is None for m in collected)
    groups = aggregate_groups(collected)
    assert not {"adapter_file_bytes", "hardware"} & {key for group in groups for key in group}
    header, rule = markdown_tables(groups, []).splitlines()[:2]
    assert header.endswith("| peak memory (MB) | adapter params |") and rule.count("---") == 9


@pytest.mark.parametrize(
    "aggregated", sorted(RESULTS.glob("**/aggregated_metrics.json")), ids=lambda path: str(path.relative_to(RESULTS))
)
def test_the_committed_results_tables_are_unchanged(aggregated):
    groups = json.loads(aggregated.read_text()).get("groups")
    if groups is None:
        pytest.skip("a combined file: its parts have their own tables")
    assert markdown_tables(groups, []) in (aggregated.parent / "results.md").read_text()
