"""A resumed run is the run it claims to be: the run identity in every checkpoint, the checks before a resume, the
checkpoint finder that passes over an interrupted save, and a warm-up that never saw a finite gradient."""

import json
import logging
import math
import shutil

import pytest
import torch
from conftest import TokenDataset, lora_model, training_args
from safetensors.torch import load_file

from fw_trainer import (
    CheckpointError,
    FWLoraArguments,
    FWLoraTrainer,
    RunMismatchError,
    WarmupDivergedError,
    last_complete_checkpoint,
    run_identity,
)
from fw_trainer.arguments import ADDED_OPTIONS
from fw_trainer.errors import ABSENT
from fw_trainer.identity import TRAINING_FIELDS
from fw_trainer.state_files import IMPORTANCE_FILE, RUN_IDENTITY_FILE


# The fields of the run part of the identity, by method; `data.task` is the default data description.
COMMON_FIELDS = ["base_model", "model_type", "num_labels", "data.task", "method"]
ADAPTER_FIELDS = ["rank", "lora_alpha", "lora_dropout", "target_modules"]
FW_FIELDS = [
    "fw_lambda",
    "fw_warmup_steps",
    "fw_warmup_mode",
    "fw_statistic",
    "fw_average",
    "fw_estimator",
    "fw_ema_decay",
    "fw_power",
    "fw_shuffle_seed",
    "fw_exempt_top",
    "fw_normalization",
    "fw_penalty",
]
ADALORA_FIELDS = [
    "adalora_init_r_ratio",
    "adalora_tinit",
    "adalora_tfinal",
    "adalora_delta_t",
    "adalora_beta1",
    "adalora_beta2",
    "adalora_orth_reg_weight",
]
RECORDED = {
    "fw_lora": COMMON_FIELDS + FW_FIELDS + ADAPTER_FIELDS + list(TRAINING_FIELDS),
    "adalora": COMMON_FIELDS + ADALORA_FIELDS + ["rank", "init_rank", *ADAPTER_FIELDS[1:]] + list(TRAINING_FIELDS),
}
FW_KWARGS = {
    "fw_lora": dict(fw_warmup_steps=2, fw_lambda=1e-1, fw_estimator="exact"),
    "adalora": dict(lora_r=2, adalora_tinit=1, adalora_tfinal=1, adalora_delta_t=1),
    "lora": {},
}


def make_trainer(output_dir, method="fw_lora", fw_kwargs=None, run_data=None, **args_kwargs):
    model, fw_args = lora_model(method, **{**FW_KWARGS[method], **(fw_kwargs or {})})
    args = training_args(output_dir, **{"max_steps": 4, "save_strategy": "steps", "save_steps": 2, **args_kwargs})
    return FWLoraTrainer(model=model, args=args, train_dataset=TokenDataset(), fw_args=fw_args, run_data=run_data)


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """A 4-step run of each method with checkpoints at steps 2 and 4, and its final model."""
    runs = {}
    for method in RECORDED:
        runs[method] = tmp_path_factory.mktemp(method)
        trainer = make_trainer(runs[method], method)
        trainer.train()
        trainer.save_model()
    return runs


@pytest.fixture
def checkpoint(finished_runs, tmp_path):
    """A copy of the FW-LoRA run's checkpoint 2, to damage at will."""
    return str(shutil.copytree(finished_runs["fw_lora"] / "checkpoint-2", tmp_path / "checkpoint-2"))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)


def flat(mapping, prefix=""):
    """`{"data": {"task": ...}}` as `{"data.task": ...}`."""
    items = {}
    for key, value in mapping.items():
        items.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return items


def another(value):
    """A value of the same kind, but different."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return value[:-1]
    return "other"


def test_every_checkpoint_records_what_the_run_is(finished_runs):
    run = finished_runs["fw_lora"]
    identity = read_json(run / RUN_IDENTITY_FILE)
    for step in (2, 4):
        assert read_json(run / f"checkpoint-{step}" / RUN_IDENTITY_FILE) == identity
    recorded = flat(identity["run"])
    assert list(recorded) == RECORDED["fw_lora"]
    assert recorded["method"] == "fw_lora" and recorded["rank"] == 8 and recorded["fw_warmup_steps"] == 2
    # The targets as resolved module names, not as the suffixes that select them.
    assert (
        len(recorded["target_modules"]) == 12 and "roberta.encoder.layer.1.output.dense" in recorded["target_modules"]
    )
    assert recorded["learning_rate"] == 1e-2 and recorded["seed"] == 0
    assert set(identity["environment"]) == {"torch", "transformers", "peft", "fw-lora", "world_size", "precision"}
    assert list(flat(read_json(finished_runs["adalora"] / RUN_IDENTITY_FILE)["run"])) == RECORDED["adalora"]


def test_rank_from_a_budget_and_the_sketch_probes_are_recorded_as_used():
    model, fw_args = lora_model(lora_budget=10.0, fw_estimator="exact")
    exact = run_identity(model, fw_args, training_args("unused"))["run"]
    assert exact["rank"] == 2 and "lora_budget" not in exact and "fw_sketch_probes" not in exact
    model, fw_args = lora_model(fw_estimator="sketch", fw_sketch_probes=4)
    assert run_identity(model, fw_args, training_args("unused"))["run"]["fw_sketch_probes"] == 4


@pytest.mark.parametrize("method, field", [(method, field) for method, fields in RECORDED.items() for field in fields])
def test_a_resume_refuses_a_checkpoint_that_differs_in_any_recorded_field(method, field, finished_runs, tmp_path):
    checkpoint = shutil.copytree(finished_runs[method] / "checkpoint-2", tmp_path / "checkpoint-2")
    identity = read_json(checkpoint / RUN_IDENTITY_FILE)
    *parents, key = ["run", *field.split(".")]
    holder = identity
    for parent in parents:
        holder = holder[parent]
    asked, holder[key] = holder[key], another(holder[key])
    write_json(checkpoint / RUN_IDENTITY_FILE, identity)

    trainer = make_trainer(tmp_path / "out", method)
    with pytest.raises(RunMismatchError) as error:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert error.value.differences == [(field, holder[key], asked)]
    assert f"{field}: " in str(error.value) and "Resume it with the arguments it was trained with" in str(error.value)
    assert not any((tmp_path / "out").iterdir())  # refused before anything was written


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(method="lora"), {"method"}),
        (dict(fw_kwargs=dict(lora_r=4)), {"rank"}),
        (dict(fw_kwargs=dict(lora_target_modules=["query", "value"])), {"target_modules"}),
        (dict(fw_kwargs=dict(fw_lambda=1.0)), {"fw_lambda"}),
        (dict(fw_kwargs=dict(fw_average="mean")), {"fw_average"}),
        (dict(learning_rate=1e-3), {"learning_rate"}),
        (dict(per_device_train_batch_size=4, seed=1), {"per_device_train_batch_size", "seed"}),
        (dict(run_data={"task": "cola"}), {"data.task"}),
    ],
    ids=["method", "rank", "targets", "lambda", "average", "learning_rate", "batch_and_seed", "task"],
)
def test_arguments_of_another_run_are_refused(change, expected, checkpoint, tmp_path):
    change = dict(change)
    method = change.pop("method", "fw_lora")
    trainer = make_trainer(tmp_path / "out", method, **change)
    with pytest.raises(RunMismatchError) as error:
        trainer.check_resume(checkpoint)
    differing = {name for name, saved, asked in error.value.differences if saved is not ABSENT and asked is not ABSENT}
    assert differing == expected
    if method == "lora":  # FW-LoRA's own arguments are named in one list, not one by one
        assert "only the checkpoint has fw_lambda, fw_warmup_steps, fw_warmup_mode and 9 more" in str(error.value)


def test_what_may_change_on_resume(checkpoint, tmp_path, caplog):
    """Length, logging, evaluation and saving cadence, evaluation batch size: the same run, trained on."""
    identity = read_json(f"{checkpoint}/{RUN_IDENTITY_FILE}")
    identity["environment"]["torch"] = "1.0.0"
    write_json(f"{checkpoint}/{RUN_IDENTITY_FILE}", identity)
    trainer = make_trainer(
        tmp_path / "out", max_steps=6, logging_steps=3, save_steps=3, per_device_eval_batch_size=2, eval_strategy="no"
    )
    with caplog.at_level(logging.WARNING, logger="fw_trainer"):
        trainer.train(resume_from_checkpoint=checkpoint)
    assert trainer.state.global_step == 6 and trainer.fisher_callback.frozen_at_step == 2
    assert "in another environment: torch 1.0.0 then" in caplog.text  # a warning, not a refusal


def test_a_checkpoint_without_identity_is_refused(checkpoint, tmp_path):
    """Every checkpoint FWLoraTrainer writes holds its identity: one without cannot be checked to be this run."""
    (tmp_path / "checkpoint-2" / RUN_IDENTITY_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"has no {RUN_IDENTITY_FILE}, which every checkpoint"):
        make_trainer(tmp_path / "out").check_resume(checkpoint)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_importances(run, edit):
    path = run / "checkpoint-2" / IMPORTANCE_FILE
    state = read_json(path)
    edit(state)
    write_json(path, state)


def edit_identity(run, edit):
    path = run / "checkpoint-2" / RUN_IDENTITY_FILE
    identity = read_json(path)
    edit(identity)
    write_json(path, identity)


# What to resume from (relative to a copy of the finished FW-LoRA run), how to damage it first, and what the error
# says.
FAULTS = {
    "missing": ("checkpoint-3", None, "does not exist. The last complete checkpoint in"),
    "a_file": ("checkpoint-2/trainer_state.json", None, "is a file, not a checkpoint"),
    "not_a_checkpoint": ("notes", lambda run: (run / "notes").mkdir(), "is not a checkpoint: it has no"),
    "output_dir": (".", None, "is the output directory of a run, not a checkpoint: pass one of its checkpoints"),
    "incomplete": ("checkpoint-2", lambda run: truncate(run / "checkpoint-2" / "trainer_state.json"), "is incomplete"),
    "damaged_identity": (
        "checkpoint-2",
        lambda run: truncate(run / "checkpoint-2" / RUN_IDENTITY_FILE),
        f"{RUN_IDENTITY_FILE} is damaged or inconsistent: not valid JSON",
    ),
    "no_importances": (
        "checkpoint-2",
        lambda run: (run / "checkpoint-2" / IMPORTANCE_FILE).unlink(),
        f"has no {IMPORTANCE_FILE}, which every checkpoint of an FW-LoRA or IW-LoRA run holds",
    ),
    "damaged_importances": (
        "checkpoint-2",
        lambda run: truncate(run / "checkpoint-2" / IMPORTANCE_FILE),
        "is damaged or inconsistent: not valid JSON",
    ),
    "importances_of_fewer_matrices": (
        "checkpoint-2",
        lambda run: edit_importances(run, lambda state: state["modules"].popitem()),
        "holds the statistics of 11 adapted matrices, but the model being trained has 12",
    ),
    "unknown_key": (
        "checkpoint-2",
        lambda run: edit_importances(run, lambda state: state.update(extra=1)),
        "it has unknown keys extra",
    ),
    "not_a_number": (
        "checkpoint-2",
        lambda run: edit_importances(run, lambda state: next(iter(state["modules"].values())).update(fisher="x")),
        "is 'x', not a finite non-negative number",
    ),
    # The options of the warm-up are compared once, in the identity (fw_importance.json only records them).
    "other_warmup_options": (
        "checkpoint-2",
        lambda run: edit_identity(run, lambda identity: identity["run"].update(fw_warmup_steps=3)),
        "fw_warmup_steps: 3 in the checkpoint, 2 asked",
    ),
    "no_adapter": (
        "checkpoint-2",
        lambda run: (run / "checkpoint-2" / "adapter_model.safetensors").unlink(),
        "holds no adapter weights",
    ),
    "damaged_adapter": (
        "checkpoint-2",
        lambda run: truncate(run / "checkpoint-2" / "adapter_model.safetensors"),
        "adapter_model.safetensors is damaged",
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_checkpoint_that_cannot_be_resumed_is_refused_before_anything_is_written(fault, finished_runs, tmp_path):
    path, damage, message = FAULTS[fault]
    run = shutil.copytree(finished_runs["fw_lora"], tmp_path / "run")
    if damage is not None:
        damage(run)
    trainer = make_trainer(tmp_path / "out")
    with pytest.raises(CheckpointError) as error:
        trainer.train(resume_from_checkpoint=str(run / path))
    assert message in str(error.value)
    assert not any((tmp_path / "out").iterdir())


def test_adapters_that_do_not_fit_the_model_are_refused(checkpoint, tmp_path):
    """An identity that matches but adapter weights of another rank (files of two runs mixed): the adapter's shapes
    tell."""
    edit_identity(tmp_path, lambda identity: identity["run"].update(rank=4))
    with pytest.raises(CheckpointError, match="do not fit the model being trained: 24 tensor"):
        make_trainer(tmp_path / "out", fw_kwargs=dict(lora_r=4)).check_resume(checkpoint)


def test_the_last_complete_checkpoint_passes_over_an_interrupted_save(finished_runs, tmp_path, caplog):
    run = shutil.copytree(finished_runs["fw_lora"], tmp_path / "run")
    assert last_complete_checkpoint(str(run)) == str(run / "checkpoint-4")
    truncate(run / "checkpoint-4" / "trainer_state.json")
    with caplog.at_level(logging.WARNING, logger="fw_trainer"):
        assert last_complete_checkpoint(str(run)) == str(run / "checkpoint-2")
    assert "checkpoint-4: its save was interrupted" in caplog.text
    trainer = make_trainer(run, max_steps=6)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 6
    with pytest.raises(CheckpointError, match="no complete checkpoint to resume from"):
        make_trainer(tmp_path / "empty").train(resume_from_checkpoint=True)


def nan_model(method_kwargs):
    model, fw_args = lora_model(**method_kwargs)
    with torch.no_grad():
        model.get_base_model().roberta.embeddings.word_embeddings.weight.fill_(math.nan)
    return model, fw_args


@pytest.mark.parametrize("mode", ["train", "calibrate"])
def test_a_warmup_without_one_finite_step_stops_training(mode, tmp_path):
    """Every micro-batch non-finite: no importances can be measured, and none are frozen (not even uniform ones)."""
    model, fw_args = nan_model(dict(fw_warmup_steps=3, fw_warmup_mode=mode))
    trainer = FWLoraTrainer(
        model=model, args=training_args(tmp_path, max_steps=5), train_dataset=TokenDataset(), fw_args=fw_args
    )
    what = "IW-LoRA calibration" if mode == "calibrate" else "FW-LoRA warm-up"
    with pytest.raises(WarmupDivergedError, match=f"The {what} saw no finite gradient: in each of its 3 steps"):
        trainer.train()
    assert not trainer.fisher_callback.frozen and not (tmp_path / IMPORTANCE_FILE).exists()
    assert trainer.state.global_step == (3 if mode == "train" else 0)


def test_a_diverging_learning_rate_freezes_importances_from_its_finite_steps(tmp_path, caplog):
    """With a learning rate that diverges, only the first step (taken from the pretrained weights) is finite: the
    importances come from it alone, as a one-step warm-up would give them, and a warning says so."""
    runs = {}
    for name, warmup_steps in (("diverging", 4), ("one_step", 1)):
        model, fw_args = lora_model(fw_warmup_steps=warmup_steps)
        runs[name] = FWLoraTrainer(
            model=model,
            args=training_args(tmp_path / name, max_steps=warmup_steps, learning_rate=1e30),
            train_dataset=TokenDataset(),
            fw_args=fw_args,
        )
        with caplog.at_level(logging.WARNING, logger="fw_trainer"):
            runs[name].train()
    assert "3 of the 4 steps of the FW-LoRA warm-up had no finite micro-batch" in caplog.text
    assert "the importances come from the other 1" in caplog.text
    diverged, one_step = (runs[name].fisher_callback for name in ("diverging", "one_step"))
    assert torch.isfinite(diverged.importances).all() and diverged.importances.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(diverged.fisher, one_step.fisher)
    assert read_json(tmp_path / "diverging" / IMPORTANCE_FILE)["num_updates"] == 1


def test_a_checkpoint_from_before_an_option_existed_resumes_as_the_uninterrupted_run(finished_runs, tmp_path):
    """Checkpoints written before `fw_shuffle_seed` and `fw_exempt_top` existed lack them in both state files; they
    were trained with the values that do what the code did then, and resume as such."""
    run = shutil.copytree(finished_runs["fw_lora"], tmp_path / "run")
    added = ("fw_shuffle_seed", "fw_exempt_top")
    edit_identity(run, lambda identity: [identity["run"].pop(name) for name in added])
    edit_importances(run, lambda state: [state.pop(name.removeprefix("fw_")) for name in added])
    trainer = make_trainer(tmp_path / "out")
    trainer.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    uninterrupted = read_json(finished_runs["fw_lora"] / "checkpoint-4" / IMPORTANCE_FILE)
    assert read_json(tmp_path / "out" / "checkpoint-4" / IMPORTANCE_FILE) == uninterrupted
    for name, tensor in load_file(finished_runs["fw_lora"] / "checkpoint-4" / "adapter_model.safetensors").items():
        torch.testing.assert_close(
            load_file(tmp_path / "out" / "checkpoint-4" / "adapter_model.safetensors")[name], tensor, rtol=0, atol=0
        )

    # Asking for another value than the one such a checkpoint ran with is another run.
    with pytest.raises(RunMismatchError, match="fw_exempt_top: 0 in the checkpoint, 1 asked"):
        make_trainer(tmp_path / "other", fw_kwargs={"fw_exempt_top": 1}).check_resume(str(run / "checkpoint-2"))


def test_the_added_options_no_op_values_are_their_defaults():
    """`ADDED_OPTIONS` says what a checkpoint that lacks an option ran with: the value that does what the code did
    before the option existed, which is the option's default (a run that does not ask for it)."""
    defaults = FWLoraArguments()
    assert {name: getattr(defaults, name) for name in ADDED_OPTIONS} == ADDED_OPTIONS
