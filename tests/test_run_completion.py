"""A finished run is a complete run (issue 28): whether a run finished is decided by what its files hold
(`run_complete.json`, written last, and the files it lists), not by which files exist; a checkpoint is resumable when
it holds what resuming needs; a resumed run's train time covers all its segments."""
# ruff: noqa: F811  (the fixtures imported from tiny_glue_runs are parameters of the tests below)

import json
import logging
import shutil

import pytest
import yaml
from conftest import TokenDataset, lora_model, training_args
from tiny_glue_runs import common, glue_dir, read_json, run, tiny_model_dir  # noqa: F401 (fixtures)

from fw_trainer import CheckpointError, FWLoraTrainer, last_complete_checkpoint
from fw_trainer.glue.completion import (
    RUN_COMPLETE_FILE,
    completion_problem,
    invalidate_completion,
    is_finished_run,
    write_completion,
)
from fw_trainer.state_files import IMPORTANCE_FILE
from fw_trainer.study.aggregate import load_finished_runs
from fw_trainer.study.config import StudyConfig, StudyConfigError
from fw_trainer.study.run_metrics import METRICS_FILE


def glue_args(model_dir, glue, out, *extra):
    return [*common(model_dir, out, "--task_name", "sst2", "--glue_dir", glue, "--report_to", "none"), *extra]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, glue_dir, tmp_path_factory):
    """A finished 12-step FW-LoRA run with checkpoints 6 and 12."""
    out = tmp_path_factory.mktemp("finished")
    assert run(glue_args(tiny_model_dir, glue_dir, out, "--save_strategy", "steps", "--save_steps", "6")) == 0
    return out


def test_the_script_records_what_it_finished(finished):
    record = read_json(finished / RUN_COMPLETE_FILE)
    assert record["phases"] == ["train", "eval"]
    assert {"all_results.json", "eval_results.json", "eval_predictions_sst2.tsv", "adapter_model.safetensors"} <= set(
        record["files"]
    )
    assert is_finished_run(str(finished))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda out: (out / RUN_COMPLETE_FILE).unlink(), "has no run_complete.json: a phase"),
        (lambda out: (out / RUN_COMPLETE_FILE).write_text("{"), "its run_complete.json is damaged"),
        (
            lambda out: (out / "eval_results.json").unlink(),
            "eval_results.json, which the finished run left, is missing",
        ),
        (lambda out: (out / "all_results.json").write_text("{}"), "all_results.json is not the file the finished run"),
    ],
)
def test_a_run_whose_files_are_not_whole_is_not_finished(finished, tmp_path, damage, problem):
    out = shutil.copytree(finished, tmp_path / "run")
    damage(out)
    assert problem in completion_problem(str(out))


def test_a_run_killed_while_it_evaluated_resumes_and_evaluates(finished, tiny_model_dir, glue_dir, tmp_path):
    """Failed before: `all_results.json` (written after training) made it "already holds a finished run": the
    evaluation was lost and the message false."""
    out = shutil.copytree(finished, tmp_path / "run")
    for name in (RUN_COMPLETE_FILE, "eval_results.json", "eval_predictions_sst2.tsv"):
        (out / name).unlink()
    assert run(glue_args(tiny_model_dir, glue_dir, out, "--save_strategy", "steps", "--save_steps", "6")) == 0
    assert is_finished_run(str(out))
    assert (
        read_json(out / "eval_results.json")["eval_accuracy"]
        == read_json(finished / "eval_results.json")["eval_accuracy"]
    )


def test_the_study_counts_only_finished_runs_and_names_damaged_metrics(finished, tmp_path):
    """Failed before: a run killed while it evaluated was aggregated (final_metric null, then a NaN mean and a crash);
    a truncated metrics.json was a JSONDecodeError that named no file."""
    spec = {"output_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results"), "axes": {"seed": [0, 1]}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    config = StudyConfig.from_yaml(str(tmp_path / "study.yaml"))
    whole, killed = (shutil.copytree(finished, tmp_path / "runs" / f"seed{seed}") for seed in (0, 1))
    for out in (whole, killed):
        (out / METRICS_FILE).write_text(json.dumps({"final_metric": 0.5, "labels": {"seed": "0"}}))
    (killed / RUN_COMPLETE_FILE).unlink()
    assert [run["run_dir"] for run in load_finished_runs(config)] == [str(whole)]
    (whole / METRICS_FILE).write_text('{"final_metric": 0.')
    with pytest.raises(StudyConfigError, match=f"{whole / METRICS_FILE} is damaged although its run"):
        load_finished_runs(config)


def make_trainer(output_dir, **args):
    model, fw_args = lora_model(fw_warmup_steps=2, fw_lambda=0.1)
    arguments = training_args(output_dir, **{"max_steps": 4, "save_strategy": "steps", "save_steps": 2, **args})
    return FWLoraTrainer(model=model, args=arguments, train_dataset=TokenDataset(), fw_args=fw_args)


def test_a_weights_only_checkpoint_is_refused_unless_asked_for(tmp_path, caplog):
    """Failed before: a `--save_only_model` checkpoint passed as complete; the resume restarted the optimizer and the
    learning-rate schedule (lr at step 200: 3.0e-5 instead of 2.5e-7) with only "Didn't find an RNG file"."""
    run = make_trainer(tmp_path / "run", save_only_model=True, logging_steps=1)
    run.train()
    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    with caplog.at_level(logging.WARNING, logger="fw_trainer"):
        assert last_complete_checkpoint(str(tmp_path / "run")) is None
    assert "checkpoint-2: it holds the weights without the optimizer state" in caplog.text  # not "interrupted"
    with pytest.raises(CheckpointError, match="holds the weights but not the optimizer state .* scheduler"):
        make_trainer(tmp_path / "again").check_resume(checkpoint)
    warm = make_trainer(tmp_path / "warm", logging_steps=1)
    warm.check_resume(checkpoint, weights_only=True)
    warm.train(resume_from_checkpoint=checkpoint)

    # What `--resume_weights_only` says it does: the remaining steps 3 and 4, on a schedule restarted from its first
    # step (the learning rates of the run's steps 1 and 2), with the importances frozen at step 2.
    def learning_rates(trainer, steps):
        return [
            entry["learning_rate"]
            for entry in trainer.state.log_history
            if entry.get("step") in steps and "learning_rate" in entry
        ]

    assert learning_rates(warm, (3, 4)) == learning_rates(run, (1, 2)) != learning_rates(run, (3, 4))
    assert warm.state.global_step == 4 and warm.fisher_callback.frozen_at_step == 2
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / IMPORTANCE_FILE).read_text())
    assert warm.fisher_callback.importances.tolist() == [row["importance"] for row in saved["modules"].values()]


def test_a_resumed_run_reports_the_train_time_of_all_its_segments(tmp_path):
    """Failed before: `train_runtime` was the last segment's only (1.31 s of a 2.56 s run)."""
    first = make_trainer(tmp_path / "run", max_steps=2)
    first.train()
    output = make_trainer(tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    metrics = output.metrics
    assert metrics["train_segments"] == 2
    assert metrics["train_runtime_total"] > metrics["train_runtime"]
    straight = make_trainer(tmp_path / "straight").train().metrics
    assert straight["train_segments"] == 1


def test_the_record_lists_the_runs_own_files_only(finished, tmp_path):
    """The sweep's `metrics.json` (written after the run) and a user's notes may change without unfinishing it; a
    resume starts by removing the record, so a run cut short after that is not taken for the finished one."""
    out = shutil.copytree(finished, tmp_path / "run")
    (out / METRICS_FILE).write_text("{}")
    (out / "notes.txt").write_text("first try")
    write_completion(str(out), ["train", "eval"])
    assert not {METRICS_FILE, "notes.txt"} & set(read_json(out / RUN_COMPLETE_FILE)["files"])
    (out / METRICS_FILE).write_text('{"final_metric": 0.5}')
    (out / "notes.txt").write_text("second try")
    assert is_finished_run(str(out))
    invalidate_completion(str(out))
    assert not is_finished_run(str(out))


def test_train_time_survives_transformers_own_restore_of_callback_states(tmp_path):
    """`--restore_callback_states_from_checkpoint` sets the saved attributes on a new instance: they must be plain
    attributes, and the trainer must read the live instance."""
    make_trainer(tmp_path / "run", max_steps=2).train()
    resumed = make_trainer(tmp_path / "run", restore_callback_states_from_checkpoint=True)
    metrics = resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2")).metrics
    assert metrics["train_segments"] == 2
