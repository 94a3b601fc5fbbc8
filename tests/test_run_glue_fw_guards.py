"""`run_glue_fw.py` never reports a wrong run as a good one: one run per output directory (two real processes), a clean
overwrite, a diverged run that fails, user faults in files and paths as one paragraph, and the importances in
TensorBoard at the freeze."""
# ruff: noqa: F811  (the fixtures imported from tiny_glue_runs are parameters of the tests below)

import glob
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_run_glue_fw_faults import base_args, error_paragraph, tree
from tiny_glue_runs import glue_dir, read_json, run, tiny_model_dir  # noqa: F401  (module-scoped fixtures)

from fw_trainer.glue.completion import completion_problem
from fw_trainer.glue.run import DIVERGED_EXIT_STATUS
from fw_trainer.glue.run_files import LOCK_FILE
from fw_trainer.state_files import IMPORTANCE_FILE
from fw_trainer.study.run_metrics import read_run_artifacts


def script(*args) -> list[str]:
    return [sys.executable, "-m", "fw_trainer.glue.run", *map(str, args)]


def test_a_second_run_into_a_directory_in_use_is_refused(tiny_model_dir, glue_dir, tmp_path, capsys):
    """Two real processes: a run in a subprocess, and runs into its directory from this one while it trains. These
    are refused before they write anything, even with --overwrite_output_dir, and the first ends as if alone. Failed
    before: both ran, and the directory ended with the second run's files."""
    out = tmp_path / "shared"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    first = subprocess.Popen(
        script(*base_args(tiny_model_dir, glue_dir, out, "--max_steps", "300", "--save_strategy", "no")),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (out / LOCK_FILE).exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (out / LOCK_FILE).exists(), "the first run took no lock"
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid
        for extra in ([], ["--overwrite_output_dir"], ["--seed", "1"]):
            assert run(base_args(tiny_model_dir, glue_dir, out, *extra)) == 2
            error = error_paragraph(capsys.readouterr().err)
            assert f"is in use by another run (process {first.pid} on this host" in error
        assert first.poll() is None, "the first run ended before the second tried: make it longer"
    finally:
        first_stderr = first.communicate(timeout=900)[1]
    assert first.returncode == 0, first_stderr[-3000:]
    assert read_json(out / "all_results.json")["train_samples"] == 96
    assert read_json(out / "trainer_state.json")["global_step"] == 300
    assert not (out / LOCK_FILE).exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tiny_model_dir, glue_dir, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_FILE).write_text(json.dumps({"pid": int(gone.stdout), "host": os.uname().nodename, "started": "x"}))
    assert run(base_args(tiny_model_dir, glue_dir, out, "--max_steps", "4", "--save_strategy", "no")) == 0
    assert "Taking over" in caplog.text and "left by a run that is gone" in caplog.text
    assert (out / "all_results.json").exists() and not (out / LOCK_FILE).exists()


def test_overwrite_output_dir_leaves_nothing_of_the_previous_run(tiny_model_dir, glue_dir, tmp_path, caplog):
    """An FW-LoRA run with checkpoints and TensorBoard events, overwritten by a LoRA run: no checkpoint, state file,
    result or event file of the first survives, and what a run does not write is kept and named. Failed before: the
    old checkpoints and fw_importance.json stayed, so the LoRA run read back with importances frozen at step 4."""
    out = tmp_path / "out"
    assert run(base_args(tiny_model_dir, glue_dir, out, "--report_to", "tensorboard")) == 0
    assert (out / "checkpoint-4").is_dir() and (out / IMPORTANCE_FILE).exists() and (out / "runs").is_dir()
    (out / "notes.txt").write_text("mine")
    lora = ["--method", "lora", "--overwrite_output_dir", "--save_strategy", "no", "--report_to", "none"]
    assert run(base_args(tiny_model_dir, glue_dir, out, *lora)) == 0
    assert "kept what a run does not write: notes.txt" in caplog.text
    names = set(os.listdir(out))
    assert not [name for name in names if name.startswith("checkpoint-")]
    assert not names & {IMPORTANCE_FILE, "runs", "fw_run.lock"} and (out / "notes.txt").read_text() == "mine"
    artefacts = read_run_artifacts(str(out))
    assert artefacts["importance"] is None
    assert json.loads((out / "fw_run_identity.json").read_text())["run"]["method"] == "lora"


def test_a_diverged_run_fails_and_keeps_its_files(tiny_model_dir, glue_dir, tmp_path, capsys):
    """Adam with epsilon 0 divides 0 by 0 where a gradient is zero (LoRA's A while B is zero): NaN weights, NaN loss.
    The run ends with an error paragraph and exit 3, keeps its files, and is not a finished run (no all_results.json).
    Failed before: exit 0 with NaN dev metrics."""
    out = tmp_path / "out"
    extra = ["--method", "lora", "--adam_epsilon", "0", "--max_grad_norm", "0", "--save_strategy", "no"]
    assert run(base_args(tiny_model_dir, glue_dir, out, *extra)) == DIVERGED_EXIT_STATUS
    error = error_paragraph(capsys.readouterr().err)
    # The Trainer's `loss` skips non-finite steps (`logging_nan_inf_filter`); `task_loss` does not.
    assert "The training diverged: the last logged task_loss = nan" in error and "not finite from step 4 on" in error
    assert "lower the learning rate (now 0.005), or clip gradients with --max_grad_norm (now off)" in error
    assert (out / "train_results.json").exists() and (out / "trainer_state.json").exists()
    assert not (out / "all_results.json").exists() and completion_problem(str(out)) is not None


def test_a_study_counts_a_diverged_run_as_failed_without_retrying(tiny_model_dir, glue_dir, tmp_path):
    from fw_trainer.study.sweep import main as sweep

    args = {"model_name_or_path": str(tiny_model_dir), "task_name": "sst2", "glue_dir": str(glue_dir),
            "do_train": True, "do_eval": True, "max_steps": 8, "per_device_train_batch_size": 16, "lora_r": 4,
            "use_cpu": True, "adam_epsilon": 0, "max_grad_norm": 0, "report_to": "none",
            "save_strategy": "no"}  # fmt: skip
    study = {"output_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results"), "args": args,
             "axes": {"method": {"lora": {"method": "lora"}}}}  # fmt: skip
    (tmp_path / "study.yaml").write_text(json.dumps(study))
    assert sweep([str(tmp_path / "study.yaml"), "--no_aggregate", "--max_retries", "2"]) != 0
    (log,) = glob.glob(str(tmp_path / "runs" / "logs" / "*.log"))
    text = Path(log).read_text()
    assert text.count("=====") == 1 and "The training diverged" in text  # one attempt: it would diverge again
    assert "trainable tensor(s), e.g. " in text  # no loss was logged: the weights tell
    assert not glob.glob(str(tmp_path / "runs" / "*" / "metrics.json"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# Fault: (what to write into tmp_path and the arguments that use it, what the message says). YAML files and data
# files stand instead of `--task_name sst2`. Each writes nothing.
FILE_FAULTS = {
    "yaml_that_does_not_parse": (
        lambda d: [write(d / "bad.yaml", "task_name: [sst2\n")],
        "bad.yaml is not valid YAML",
    ),
    "yaml_value_of_the_wrong_type": (
        lambda d: [write(d / "typed.yaml", "task_name: sst2\nlora_r: four\n")],
        "Argument --lora_r/--lora-r: invalid int value: 'four'",
    ),
    "empty_data_file": (
        lambda d: ["--train_file", write(d / "train.csv", ""), "--validation_file", write(d / "dev.csv", "")],
        "train.csv is empty",
    ),
    "header_only": (
        lambda d: [
            "--train_file",
            write(d / "train.csv", "sentence,label\n"),
            "--validation_file",
            write(d / "dev.csv", "sentence,label\ngood,1\n"),
        ],
        "has no rows, only a header",
    ),  # fmt: skip
    "labels_the_training_split_lacks": (
        lambda d: [
            "--train_file",
            write(d / "train.csv", "sentence,label\ngood,pos\nbad,neg\n"),
            "--validation_file",
            write(d / "dev.csv", "sentence,label\nfine,pos\nmeh,neutral\n"),
        ],
        "has labels that the train file lacks: neutral",
    ),  # fmt: skip
    "an_adapter_as_the_model": (
        lambda d: ["--model_name_or_path", write_adapter(d)],
        "holds a LoRA adapter, not a model: pass its base model, --model_name_or_path base/model",
    ),
    "a_model_path_that_does_not_exist": (
        lambda d: ["--model_name_or_path", d / "no-such-model"],
        "no-such-model does not exist. Pass a saved model's directory or a model id of the Hub",
    ),
    "a_directory_without_a_model": (
        lambda d: ["--model_name_or_path", make_dir(d / "empty")],
        "is a directory without a model (no config.json)",
    ),
    "a_tokenizer_that_is_not_one": (
        lambda d: ["--tokenizer_name", make_dir(d / "no-tokenizer")],
        "or leave --tokenizer_name out to use the model's own",
    ),
    "output_dir_is_a_file": (lambda d: ["--output_dir", write(d / "taken", "a file")], "taken is a file"),
    "output_dir_that_cannot_be_created": (
        lambda d: ["--output_dir", "/proc/fw-lora-run"],
        "The output directory /proc/fw-lora-run cannot be created",
    ),
    "yaml_list_for_a_single_value": (
        lambda d: [write(d / "listed.yaml", "task_name: sst2\nlora_r: [1, 2]\n")],
        "Unknown arguments: 2. See `python run_glue_fw.py --help`. In ",
    ),
}


def write_adapter(d: Path) -> Path:
    (d / "adapter").mkdir()
    write(d / "adapter" / "adapter_config.json", json.dumps({"base_model_name_or_path": "base/model"}))
    return d / "adapter"


def make_dir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("fault", FILE_FAULTS)
def test_a_file_or_path_fault_is_one_paragraph_and_writes_nothing(fault, tiny_model_dir, glue_dir, tmp_path, capsys):
    make, message = FILE_FAULTS[fault]
    given = [str(arg) for arg in make(tmp_path)]
    args = [str(arg) for arg in base_args(tiny_model_dir, glue_dir, tmp_path / "out")]
    if given[0].endswith((".yaml", ".csv")) or fault.endswith("data_file") or "--train_file" in given:
        at = args.index("--task_name")
        args = args[:at] + args[at + 2 :]
    args = [given[0], *args] if given[0].endswith(".yaml") else [*args, *given]
    before = tree(tmp_path)
    assert run(args) == 2
    stderr = capsys.readouterr().err
    assert message in error_paragraph(stderr) and "usage:" not in stderr
    assert tree(tmp_path) == before


def test_aggregate_given_a_directory_says_what_to_pass(tmp_path, capsys):
    from fw_trainer.study.aggregate import main as aggregate

    assert aggregate([str(tmp_path)]) == 2
    assert "is a directory: pass the study's YAML file" in capsys.readouterr().err


def test_a_study_file_that_does_not_parse_is_one_line(tmp_path, capsys):
    from fw_trainer.study.sweep import main as sweep

    (tmp_path / "study.yaml").write_text("axes: {method: [lora\n")
    assert sweep([str(tmp_path / "study.yaml"), "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert "study.yaml is not valid YAML" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra, frozen_at",
    [
        (["--fw_warmup_steps", "2", "--max_steps", "5"], 2),  # frozen mid-run, no training log after it
        (["--fw_warmup_steps", "10", "--max_steps", "3"], 3),  # training shorter than the warm-up
        (["--method", "iw_lora", "--fw_warmup_steps", "2", "--max_steps", "3"], 0),  # IW-LoRA's calibration
    ],
)
def test_importances_reach_tensorboard_at_the_freeze(
    extra, frozen_at, tiny_model_dir, glue_dir, tmp_path, monkeypatch
):
    """Read back with TensorBoard's reader, at the step of the freeze. Failed before: the importances waited for the
    first training log after the freeze, which these runs never have (logging every 50 steps)."""
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = [*base_args(tiny_model_dir, glue_dir, tmp_path / "out"), "--report_to", "tensorboard"]
    assert run([*args, "--logging_steps", "50", "--save_strategy", "no", *extra]) == 0
    assert read_json(tmp_path / "out" / IMPORTANCE_FILE)["frozen_at_step"] == frozen_at
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    tags = [tag for tag in accumulator.Tags()["scalars"] if tag.startswith("train/fw_importance/")]
    assert len(tags) == 12
    steps = {event.step for tag in tags for event in accumulator.Scalars(tag)}
    assert steps == {frozen_at}
    assert [image.step for image in accumulator.Images("fw_importance/heatmap")] == list(steps)
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))


def test_without_matplotlib_the_importances_reach_tensorboard_without_the_heatmap(
    tiny_model_dir, glue_dir, tmp_path, monkeypatch, caplog
):
    """The heatmap needs matplotlib, which the core install lacks: the scalars still go, with a warning saying so."""
    import fw_trainer.trainer_mixin

    monkeypatch.setattr(fw_trainer.trainer_mixin, "missing_modules", lambda modules: list(modules))
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = [*base_args(tiny_model_dir, glue_dir, tmp_path / "out"), "--report_to", "tensorboard"]
    with caplog.at_level(logging.WARNING, logger="fw_trainer"):
        assert run([*args, "--logging_steps", "50", "--save_strategy", "no"]) == 0
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    assert len([tag for tag in accumulator.Tags()["scalars"] if tag.startswith("train/fw_importance/")]) == 12
    assert accumulator.Tags()["images"] == []
    assert "without their heatmap image: drawing it needs matplotlib" in caplog.text
