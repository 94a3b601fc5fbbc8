"""`run_glue_fw.py` off the happy path: every fault a user can cause ends in one `error:` paragraph and exit status 2
with nothing written, a run killed while it saves resumes as if it had not been, and the command users type does the
job."""
# ruff: noqa: F811  (the fixtures imported from tiny_glue_runs are parameters of the tests below)

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_glue_runs import common, glue_dir, read_json, run, tiny_model_dir  # noqa: F401
from transformers import AutoModelForSequenceClassification

from fw_trainer.checkpoints import is_complete_checkpoint
from fw_trainer.glue import run as run_glue_fw
from fw_trainer.state_files import IMPORTANCE_FILE, RUN_IDENTITY_FILE


WORKER = Path(__file__).resolve().parent / "interrupted_worker.py"


def base_args(model_dir, glue, output_dir, *extra):
    """An FW-LoRA SST-2 run of 12 steps (K = 4) with a checkpoint every 4 steps."""
    return [
        *common(model_dir, output_dir, "--task_name", "sst2", "--glue_dir", glue, "--report_to", "none"),
        "--save_strategy",
        "steps",
        "--save_steps",
        "4",
        *extra,
    ]


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, glue_dir, tmp_path_factory):
    """An uninterrupted run, with checkpoints 4, 8 and 12."""
    out = tmp_path_factory.mktemp("straight")
    assert run(base_args(tiny_model_dir, glue_dir, out)) == 0
    return out


@pytest.fixture
def interrupted(straight_run, tmp_path):
    """An output directory left by a run interrupted after step 8: checkpoints 4 and 8, nothing else."""
    out = tmp_path / "interrupted"
    for step in (4, 8):
        shutil.copytree(straight_run / f"checkpoint-{step}", out / f"checkpoint-{step}")
    return out


def tree(path: Path):
    """Every file and folder under `path`, with the files' bytes (`None` where `path` does not exist)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def error_paragraph(stderr: str) -> str:
    """The `error:` paragraph, after asserting that it is the only one, on one line, with no traceback."""
    assert "Traceback" not in stderr
    assert stderr.startswith("error: ") or "\nerror: " in stderr, stderr
    error = stderr.split("\nerror: ")[-1] if "\nerror: " in stderr else stderr.removeprefix("error: ")
    assert len(error.strip().splitlines()) == 1, error
    return error


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def strip_training_state(checkpoint: Path) -> None:
    """The checkpoint as `--save_only_model` writes it: without the optimizer's, scheduler's and generators' state."""
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (checkpoint / name).unlink()


def edit_json(path: Path, edit) -> None:
    state = read_json(path)
    edit(state)
    path.write_text(json.dumps(state))


NEW_RUN = "For a new run instead, leave out --resume_from_checkpoint and pass --overwrite_output_dir"
# Fault: (extra arguments, with {out} for the output directory; how to damage it first; what the message says;
# the remedy it gives). The output directory is the interrupted run's, resumed from its last checkpoint (8) unless
# `--resume_from_checkpoint` says otherwise.
RESUME_FAULTS = {
    "missing_checkpoint": (
        ["--resume_from_checkpoint", "{out}/checkpoint-80"],
        None,
        "checkpoint-80 does not exist. The last complete checkpoint in",
        "Pass an existing one",
    ),
    "not_a_checkpoint": (
        ["--resume_from_checkpoint", "{out}/notes"],
        lambda out: (out / "notes").mkdir(),
        "notes is not a checkpoint: it has no trainer_state.json",
        "Pass a checkpoint",
    ),
    "incomplete_checkpoint": (
        ["--resume_from_checkpoint", "{out}/checkpoint-8"],
        lambda out: truncate(out / "checkpoint-8" / "trainer_state.json"),
        "checkpoint-8 is incomplete: its trainer_state.json is missing or damaged",
        "Resume from an earlier checkpoint",
    ),
    "no_complete_checkpoint": (
        [],
        lambda out: (shutil.rmtree(out / "checkpoint-4"), truncate(out / "checkpoint-8" / "trainer_state.json")),
        "is not empty and holds no complete checkpoint to resume from",
        "Pass --overwrite_output_dir to write into it anyway",
    ),
    # Only `--save_only_model` checkpoints: the way to warm-start from one is named, not only the way to delete it.
    "only_weights_only_checkpoints": (
        [],
        lambda out: (shutil.rmtree(out / "checkpoint-4"), strip_training_state(out / "checkpoint-8")),
        "Its last checkpoint, {out}/checkpoint-8, holds the weights without the training state",
        "pass --resume_from_checkpoint {out}/checkpoint-8 --resume_weights_only to warm-start from it",
    ),
    "damaged_importances": (
        [],
        lambda out: truncate(out / "checkpoint-8" / IMPORTANCE_FILE),
        f"checkpoint-8/{IMPORTANCE_FILE} is damaged or inconsistent: not valid JSON",
        "Resume from an earlier checkpoint",
    ),
    "importances_of_the_wrong_length": (
        [],
        lambda out: edit_json(out / "checkpoint-8" / IMPORTANCE_FILE, lambda s: s["modules"].popitem()),
        "holds the statistics of 11 adapted matrices, but the model being trained has 12",
        "Resume from an earlier checkpoint",
    ),
    "importances_with_unknown_keys": (
        [],
        lambda out: edit_json(out / "checkpoint-8" / IMPORTANCE_FILE, lambda s: s.update(fisher_v2=[])),
        "it has unknown keys fisher_v2",
        "Resume from an earlier checkpoint",
    ),
    "damaged_identity": (
        [],
        lambda out: truncate(out / "checkpoint-8" / RUN_IDENTITY_FILE),
        f"{RUN_IDENTITY_FILE} is damaged or inconsistent: not valid JSON",
        "Resume from an earlier checkpoint",
    ),
    "another_method": (
        ["--method", "lora"],
        None,
        "is another run than the one asked for: method: 'fw_lora' in the checkpoint, 'lora' asked; only the "
        "checkpoint has fw_lambda, fw_warmup_steps",
        "Resume it with the arguments it was trained with",
    ),
    "another_rank_and_learning_rate": (
        ["--lora_r", "8", "--learning_rate", "1e-3"],
        None,
        "rank: 4 in the checkpoint, 8 asked; learning_rate: 0.005 in the checkpoint, 0.001 asked",
        "Resume it with the arguments it was trained with",
    ),
    "another_task_length": (
        ["--max_seq_length", "16"],
        None,
        "data.max_seq_length: 64 in the checkpoint, 16 asked",
        "Resume it with the arguments it was trained with",
    ),
    # An identity that matches but adapter weights of another rank (files of two runs mixed): the shapes tell.
    "adapters_that_do_not_fit": (
        ["--lora_r", "8"],
        lambda out: edit_json(
            out / "checkpoint-8" / RUN_IDENTITY_FILE, lambda identity: identity["run"].update(rank=8)
        ),
        "The adapter weights in {out}/checkpoint-8 do not fit the model being trained: 24 tensor(s) differ",
        "resume with those",
    ),
}


@pytest.mark.parametrize("fault", RESUME_FAULTS)
def test_a_checkpoint_fault_is_one_paragraph_and_changes_nothing(
    fault,
    interrupted,
    tiny_model_dir,  # noqa: F811
    glue_dir,  # noqa: F811
    capsys,
):
    extra, damage, message, remedy = RESUME_FAULTS[fault]
    if damage is not None:
        damage(interrupted)
    before = tree(interrupted)
    extra = [arg.format(out=interrupted) for arg in extra]
    assert run(base_args(tiny_model_dir, glue_dir, interrupted, *extra)) == 2
    error = error_paragraph(capsys.readouterr().err)
    assert message.format(out=interrupted) in error and remedy.format(out=interrupted) in error
    if fault not in (
        "no_complete_checkpoint",
        "only_weights_only_checkpoints",
    ):  # the library's checkpoint errors, with the script's way to a new run
        assert NEW_RUN in error
    assert tree(interrupted) == before


# Fault: (extra arguments, what the message says). Each starts a new run in an output directory that does not exist.
ARGUMENT_FAULTS = {
    "beta_out_of_range": (["--adam_beta1", "1.5"], "--adam_beta1 should be in [0, 1), but the value passed is 1.5."),
    "negative_learning_rate": (["--learning_rate", "-1"], "--learning_rate should be a finite number >= 0"),
    "zero_batch_size": (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size should be a positive"),
    "zero_accumulation": (
        ["--gradient_accumulation_steps", "0"],
        "--gradient_accumulation_steps should be a positive",
    ),
    "negative_seed": (["--seed", "-1"], "--seed should be an integer in [0, 2**32)"),
    "no_epochs": (["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs 0.0 without --max_steps"),
    "zero_sequence_length": (["--max_seq_length", "0"], "`max_seq_length` should be >= 1"),
    "no_train_samples": (["--max_train_samples", "0"], "`max_train_samples` should be >= 1"),
    # An optional package the arguments need (issue 28: an ImportError inside train(), after files were written).
    "liger_not_installed": (["--use_liger_kernel"], "--use_liger_kernel needs the liger-kernel package"),
    # A run that would train nothing (issue 28: it ended with exit 0, train_loss 0.0 and uniform importances frozen).
    "no_batch": (
        ["--max_train_samples", "8", "--per_device_train_batch_size", "16", "--dataloader_drop_last"],
        "The training data gives no batch, so nothing would train: 8 rows, batches of 16",
    ),
    # Rejected by torch or transformers themselves, when training would start.
    "optimizer_arguments": (
        ["--optim_args", "betas"],
        "Training cannot start: the optimizer rejects the arguments (ValueError: ",
    ),
    "scheduler_arguments": (
        ["--lr_scheduler_kwargs", '{"num_cycles": 2}'],
        "Training cannot start: the learning-rate scheduler rejects the arguments (TypeError: "
        "get_linear_schedule_with_warmup() got an unexpected keyword argument 'num_cycles'). Check "
        "--lr_scheduler_type, --lr_scheduler_kwargs.",
    ),
    "dataloader_arguments": (
        ["--dataloader_persistent_workers", "true"],
        "Training cannot start: the training dataloader rejects the arguments (ValueError: persistent_workers option "
        "needs num_workers > 0). Check --per_device_train_batch_size, --dataloader_*.",
    ),
    # Issue 18: numbers out of their domain (NaN and infinities first), legal but pointless values, ambiguous data,
    # and faults that were a traceback or the whole usage. Each ran (silently wrong) or crashed before.
    "nan_lambda": (
        ["--fw_lambda", "nan"],
        "`fw_lambda` should be greater than or equal to 0, but the value passed is nan",
    ),
    "infinite_power": (
        ["--fw_power", "inf"],
        "`fw_power` should be greater than or equal to 0, but the value passed is inf",
    ),
    "infinite_alpha": (["--lora_alpha", "inf"], "`lora_alpha` should be greater than 0, but the value passed is inf"),
    "nan_learning_rate": (
        ["--learning_rate", "nan"],
        "--learning_rate should be a finite number, but the value passed is nan",
    ),
    "nan_clipping": (
        ["--max_grad_norm", "nan"],
        "--max_grad_norm should be a finite number, but the value passed is nan",
    ),
    "negative_clipping": (["--max_grad_norm", "-1"], "--max_grad_norm should be a number >= 0 (0 turns clipping off)"),
    "infinite_epochs": (
        ["--max_steps", "-1", "--num_train_epochs", "inf"],
        "--num_train_epochs should be a finite number",
    ),
    "nan_warmup_ratio": (["--warmup_steps", "nan"], "--warmup_steps should be a finite number"),
    "rank_above_the_smaller_side": (["--lora_r", "40"], "A LoRA rank of 40 does not fit bert.encoder.layer.0"),
    "no_warmup": (["--fw_warmup_steps", "0"], "--fw_warmup_steps 0 measures nothing"),
    "task_and_files": (
        ["--train_file", "train.csv"],
        "--task_name loads a GLUE task and --train_file/--validation_file",
    ),
    "unknown_integration": (["--report_to", "tensorbored"], "--report_to tensorbored is not an integration"),
    "uninstalled_integration": (
        ["--report_to", "wandb"],
        "--report_to wandb needs the wandb package, which is not installed",
    ),
    "unknown_metric": (
        ["--metric_name", "no_such_metric"],
        "Could not load the metric 'no_such_metric' with `evaluate`",
    ),
    "wrong_type": (["--lora_r", "four"], "Argument --lora_r/--lora-r: invalid int value: 'four'. See --help."),
    "invalid_choice": (
        ["--fw_estimator", "exactly"],
        "Argument --fw_estimator/--fw-estimator: invalid choice: 'exactly'",
    ),
    "yaml_not_first": (["run.yaml"], "The config file run.yaml must come first"),
}


@pytest.mark.parametrize("fault", ARGUMENT_FAULTS)
def test_an_argument_fault_is_one_paragraph_and_writes_nothing(
    fault,
    tiny_model_dir,  # noqa: F811
    glue_dir,  # noqa: F811
    tmp_path,
    capsys,
):
    extra, message = ARGUMENT_FAULTS[fault]
    out = tmp_path / "new" / "run"
    assert run(base_args(tiny_model_dir, glue_dir, out, *extra)) == 2
    stderr = capsys.readouterr().err
    assert message in error_paragraph(stderr) and "usage:" not in stderr
    assert not (tmp_path / "new").exists()  # not even the folders the Trainer creates


def test_a_diverged_warmup_is_one_paragraph(tiny_model_dir, glue_dir, tmp_path, capsys):
    """A model that computes NaN from the start: the warm-up has nothing to measure, and the run stops there."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.fill_(math.nan)
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken-model")
    model.save_pretrained(broken)
    assert run(base_args(broken, glue_dir, tmp_path / "out")) == 2
    error = error_paragraph(capsys.readouterr().err)
    assert "The FW-LoRA warm-up saw no finite gradient: in each of its 4 steps" in error
    assert "lower the learning rate" in error and not (tmp_path / "out" / IMPORTANCE_FILE).exists()


@pytest.mark.parametrize("kill_point", ["importances", "trainer_state"])
def test_a_run_killed_while_saving_resumes_as_the_uninterrupted_run(
    kill_point,
    straight_run,
    tiny_model_dir,  # noqa: F811
    glue_dir,  # noqa: F811
    tmp_path,
):
    out = tmp_path / "killed"
    args = [str(arg) for arg in base_args(tiny_model_dir, glue_dir, out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    killed = subprocess.run(
        [sys.executable, str(WORKER), kill_point, "checkpoint-8", *args], env=env, capture_output=True, timeout=600
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    checkpoint = out / "checkpoint-8"
    assert is_complete_checkpoint(str(out / "checkpoint-4")) and not is_complete_checkpoint(str(checkpoint))
    if kill_point == "importances":
        # The temporary file is there, whole; the file a resume reads never was.
        assert not (checkpoint / IMPORTANCE_FILE).exists()
        assert [name for name in os.listdir(checkpoint) if name.startswith(".tmp-")]

    # The same command again: it passes over the interrupted checkpoint 8 and resumes from checkpoint 4.
    assert run(args) == 0
    assert read_json(out / "trainer_state.json")["global_step"] == 12
    resumed, straight = (
        load_file(out / "adapter_model.safetensors"),
        load_file(straight_run / "adapter_model.safetensors"),
    )
    assert resumed.keys() == straight.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-7, msg=name)
    importances = [read_json(d / IMPORTANCE_FILE) for d in (out, straight_run)]
    assert importances[0]["frozen_at_step"] == importances[1]["frozen_at_step"] == 4
    for name, entry in importances[0]["modules"].items():
        assert entry["importance"] == pytest.approx(importances[1]["modules"][name]["importance"], rel=1e-6)
    results = [read_json(d / "all_results.json") for d in (out, straight_run)]
    assert results[0]["eval_accuracy"] == results[1]["eval_accuracy"]
    assert results[0]["eval_loss"] == pytest.approx(results[1]["eval_loss"], rel=1e-5)


def test_the_command_users_type_trains_and_evaluates(tiny_model_dir, glue_dir, tmp_path, monkeypatch, capsys):
    """No --do_train/--do_eval/--do_predict and no --output_dir: train, evaluate, into outputs/<task>-<method>."""
    monkeypatch.chdir(tmp_path)
    args = [
        "--model_name_or_path",
        tiny_model_dir,
        "--glue_dir",
        glue_dir,
        "--task_name",
        "sst2",
        "--method",
        "fw_lora",
        "--bf16",
        "--use_cpu",
        "--max_steps",
        "6",
        "--fw_warmup_steps",
        "2",
        "--report_to",
        "none",
    ]
    assert run(args) == 0
    out = tmp_path / "outputs" / "sst2-fw_lora"
    results = read_json(out / "all_results.json")
    assert results["train_samples"] == 96 and "eval_accuracy" in results
    assert read_json(out / IMPORTANCE_FILE)["frozen_at_step"] == 2
    assert not (tmp_path / "trainer_output").exists()
    assert run(args) == 2  # and the same command again does not write over it
    assert "already holds a finished run" in capsys.readouterr().err


def test_help_documents_the_defaults_and_what_may_change_on_resume(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_glue_fw.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Without --do_train, --do_eval or --do_predict it trains and evaluates" in text
    assert "outputs/<task>-<method>" in text
    assert "Everything else may change on resume: --num_train_epochs and --max_steps" in text
