"""The committed study and ablation files: every run parses as `run_glue_fw.py` arguments, and the "warm-up only"
ablation reproduces LoRA exactly."""

import glob
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_glue_runs import common, glue_dir, read_json, run, run_glue_fw, tiny_model_dir  # noqa: F401

from fw_trainer.glue.arguments import to_argv
from fw_trainer.study.config import StudyConfig


REPO = Path(__file__).resolve().parents[1]
STUDY_FILES = sorted(
    glob.glob(str(REPO / "configs" / "studies" / "*.yaml")) + glob.glob(str(REPO / "configs" / "ablations" / "*.yaml"))
)


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: Path(p).stem)
def test_every_run_of_every_study_parses(path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = StudyConfig.from_yaml(path)
    names = [run.name for run in config.runs()]
    assert len(names) == len(set(names))  # one directory per run
    for run_ in config.runs():
        argv = ([config.base_config] if config.base_config else []) + to_argv(run_.args)
        # --use_cpu: the GPU studies ask for bf16, which TrainingArguments refuses on a CPU-only machine.
        _, _, fw_args, _, training_args = run_glue_fw.parse_args([*argv, "--output_dir", "x", "--use_cpu", "true"])
        for key, value in run_.args.items():
            parsed = getattr(fw_args, key, getattr(training_args, key, None))
            if key in ("method", "seed", "fw_lambda", "fw_normalization", "fw_penalty", "fw_warmup_steps"):
                assert parsed == value


def test_warmup_only_ablation_equals_lora(tiny_model_dir, glue_dir, tmp_path):  # noqa: F811
    config = StudyConfig.from_yaml(str(REPO / "configs" / "ablations" / "warmup_only.yaml"))
    for label, variant in config.axes["method"].items():
        args = common(tiny_model_dir, tmp_path / label, "--task_name", "sst2", "--glue_dir", glue_dir)
        assert run([*args, *to_argv(variant), "--report_to", "none"]) == 0
    lora, warmup_only = tmp_path / "lora", tmp_path / "warmup_only"
    assert read_json(warmup_only / "fw_importance.json")["frozen"]  # the warm-up did run
    weights, reference = (
        load_file(warmup_only / "adapter_model.safetensors"),
        load_file(lora / "adapter_model.safetensors"),
    )
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in weights)
    losses = [
        [e["loss"] for e in read_json(d / "trainer_state.json")["log_history"] if "loss" in e]
        for d in (lora, warmup_only)
    ]
    assert losses[0] == losses[1]
    assert (lora / "eval_predictions_sst2.tsv").read_text() == (warmup_only / "eval_predictions_sst2.tsv").read_text()
