"""The GLUE script's faults that come from its environment rather than its arguments (issue 28): a YAML file with
non-ASCII text under a non-UTF-8 locale, an optional package the arguments ask for that is not installed, a string
where a list of target modules is expected, and a disk that fills while a checkpoint is written. Each ends in one
`error:` paragraph, or works."""
# ruff: noqa: F811  (the fixtures imported from tiny_glue_runs are parameters of the tests below)

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tiny_glue_runs import common, glue_dir, run, tiny_model_dir  # noqa: F401 (fixtures)

from fw_trainer import FWLoraArguments


def test_a_yaml_file_with_non_ascii_text_reads_under_a_c_locale(tmp_path):
    """Failed before: files opened without an encoding took the locale's (ASCII under `LC_ALL=C` without UTF-8
    mode): UnicodeDecodeError."""
    config = tmp_path / "run.yaml"
    config.write_text("# Résumé: the café run\ntask_name: sst2\nmethod: lora\noutput_dir: out\n", encoding="utf-8")
    code = "from fw_trainer.glue.arguments import parse_args; print(parse_args([__import__('sys').argv[1]])[2].method)"
    environment = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "ascii"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(config)], cwd=tmp_path, env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("lora")


def test_one_target_module_given_as_a_string_is_that_module():
    """Failed before: `lora_target_modules="query"` was read letter by letter ("target 'q' matches no linear
    layer")."""
    assert FWLoraArguments(lora_target_modules="query").lora_target_modules == ["query"]


def test_a_disk_that_fills_during_a_checkpoint_is_one_paragraph_and_the_rerun_finishes(
    tiny_model_dir, glue_dir, tmp_path, monkeypatch, capsys
):
    """The save of checkpoint 8 meets a full disk (its trainer_state.json is `/dev/full`, where every write fails
    with the kernel's ENOSPC). Failed before: `OSError: [Errno 28] No space left on device` with its traceback."""
    import fw_trainer.glue.run as script

    class FillsTheDiskAtStep7(script.FWLoraTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.state.global_step == 7:
                checkpoint = Path(self.args.output_dir) / "checkpoint-8"
                checkpoint.mkdir(parents=True, exist_ok=True)
                if not (checkpoint / "trainer_state.json").is_symlink():
                    os.symlink("/dev/full", checkpoint / "trainer_state.json")
            return super().training_step(model, inputs, num_items_in_batch)

    out = tmp_path / "out"
    args = [*common(tiny_model_dir, out, "--task_name", "sst2", "--glue_dir", glue_dir, "--report_to", "none")]
    args += ["--save_strategy", "steps", "--save_steps", "4"]
    with monkeypatch.context() as patch:
        patch.setattr(script, "FWLoraTrainer", FillsTheDiskAtStep7)
        assert run(args) == 2
    stderr = capsys.readouterr().err
    error = stderr.splitlines()[-1]
    assert error.startswith("error: The run could not write its files in") and "Traceback" not in stderr
    assert "the disk is full (No space left on device" in error and "run the same command again" in error
    (out / "checkpoint-8" / "trainer_state.json").unlink()  # space freed
    assert run(args) == 0  # resumes from checkpoint 4, passing over the cut-off checkpoint 8
    assert (out / "run_complete.json").exists()


def test_a_sequence_length_beyond_the_models_positions_is_refused(tiny_model_dir, glue_dir, tmp_path, capsys):
    """A tokenizer without `model_max_length` (here: 512 for a model of 64 positions) let `--max_seq_length 128`
    through; with padding to that length, every batch is longer than the model. Failed before: a traceback in the
    first step (BERT: `RuntimeError: The expanded size of the tensor (128) must match the existing size (64)`)."""
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 512}))
    out = tmp_path / "new" / "out"
    args = common(str(model_dir), out, "--task_name", "sst2", "--glue_dir", glue_dir, "--report_to", "none")
    assert run([*args, "--max_seq_length", "128", "--pad_to_max_length", "true"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("error: --max_seq_length 128 is longer than the model's 64 positions")
    assert not (tmp_path / "new").exists()
