"""Study files for the sweep's tests: a grid over a tiny GLUE run, written as the YAML a user would write."""

from pathlib import Path

import yaml


def write_study(tmp_path, model_dir, glue, axes, **extra) -> Path:
    spec = {
        "output_dir": str(tmp_path / "out"),
        "results_dir": str(tmp_path / "results"),
        "args": {
            "model_name_or_path": model_dir,
            "glue_dir": str(glue),
            "task_name": "sst2",
            "do_train": True,
            "do_eval": True,
            "per_device_train_batch_size": 16,
            "learning_rate": 5e-3,
            "max_steps": 12,
            "logging_steps": 4,
            "eval_strategy": "steps",
            "eval_steps": 6,
            "lora_r": 4,
            "fw_warmup_steps": 4,
            "use_cpu": True,
            "report_to": "none",
            "disable_tqdm": True,
        },
        "axes": axes,
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write_script_study(tmp_path, script_source: str, args: dict, seeds) -> Path:
    """A study whose runs are `script_source` (a stand-in for `run_glue_fw.py`), one per seed."""
    script = tmp_path / "fake_run.py"
    script.write_text(script_source)
    spec = {
        "output_dir": str(tmp_path / "out"),
        "results_dir": str(tmp_path / "results"),
        "script": str(script),
        "args": args,
        "axes": {"seed": list(seeds)},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path
