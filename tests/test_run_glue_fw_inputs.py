"""`run_glue_fw.py` on what a user gives it (`tiny_glue_runs`): pair, regression and MNLI tasks in the GLUE layout,
csv files of one's own, a YAML config overridden on the command line, and bad input as one clear error."""
# ruff: noqa: F811  (the fixtures imported from tiny_glue_runs are parameters of the tests below)

import random

import pytest
import yaml
from tiny_glue_runs import common, glue_dir, read_json, run, sentence, tiny_model_dir, write_csv  # noqa: F401


def test_pair_task_with_predictions(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "rte"
    assert run(common(tiny_model_dir, out, "--task_name", "rte", "--glue_dir", glue_dir, "--do_predict")) == 0
    with open(out / "predict_results_rte.txt") as f:
        lines = f.read().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 11
    assert {line.split("\t")[1] for line in lines[1:]} <= {"entailment", "not_entailment"}
    assert "eval_accuracy" in read_json(out / "eval_results.json")


def test_regression_task(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "stsb"
    args = common(tiny_model_dir, out, "--task_name", "stsb", "--glue_dir", glue_dir)
    # The saved tiny model has a 2-class head: a regression head needs the flag, as in run_glue.
    assert run(args) == 2
    assert run([*args, "--ignore_mismatched_sizes"]) == 0
    results = read_json(out / "eval_results.json")
    assert {"eval_pearson", "eval_spearmanr", "eval_combined_score"} <= set(results)
    assert results["eval_combined_score"] == pytest.approx((results["eval_pearson"] + results["eval_spearmanr"]) / 2)


def test_mnli_is_evaluated_matched_and_mismatched(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "mnli"
    args = common(tiny_model_dir, out, "--task_name", "mnli", "--glue_dir", glue_dir, "--ignore_mismatched_sizes")
    assert run(args) == 0
    results = read_json(out / "eval_results.json")
    assert (results["eval_samples"], results["eval_samples_mm"]) == (16, 24)
    assert {"eval_accuracy", "eval_accuracy_mm"} <= set(results)


def test_own_csv_files_with_string_labels(tiny_model_dir, tmp_path):
    rng = random.Random(1)
    rows = [(sentence(rng), rng.choice(["neg", "pos"])) for _ in range(48)]
    write_csv(tmp_path / "train.csv", rows, ("text", "label"))
    write_csv(tmp_path / "dev.csv", rows[:16], ("text", "label"))
    write_csv(tmp_path / "test.csv", [(r[0],) for r in rows[:5]], ("text",))
    out = tmp_path / "out"
    args = common(
        tiny_model_dir, out, "--train_file", tmp_path / "train.csv", "--validation_file", tmp_path / "dev.csv"
    )
    assert run([*args, "--test_file", tmp_path / "test.csv", "--do_predict"]) == 0
    with open(out / "predict_results_custom.txt") as f:
        assert {line.split("\t")[1] for line in f.read().splitlines()[1:]} <= {"neg", "pos"}


def test_yaml_config_with_command_line_override(tiny_model_dir, glue_dir, tmp_path):
    config = {
        "model_name_or_path": tiny_model_dir, "task_name": "sst2", "glue_dir": str(glue_dir), "method": "lora",
        "do_train": True, "do_eval": True, "max_steps": 2, "per_device_train_batch_size": 8, "use_cpu": True,
        "lora_target_modules": ["query", "value"], "report_to": "none", "output_dir": str(tmp_path / "out"),
    }  # fmt: skip
    with open(tmp_path / "run.yaml", "w") as f:
        yaml.safe_dump(config, f)
    assert run([tmp_path / "run.yaml", "--max_steps", "3"]) == 0
    assert read_json(tmp_path / "out" / "trainer_state.json")["global_step"] == 3
    summary = read_json(tmp_path / "out" / "adapter_summary.json")
    assert summary["method"] == "lora" and len(summary["target_modules"]) == 4
    assert not (tmp_path / "out" / "runs").exists()  # report_to none from the file was respected


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_task", "Unknown task 'sst3'"),
        ("mismatched_columns", "has the columns"),
        ("mixed_formats", "all be csv or all be json"),
        ("budget_too_small", "too small for rank 1"),
        ("offline_model", "pass a local directory"),
        ("missing_glue_file", "GLUE"),
        ("fp16_on_cpu", "--fp16 needs a GPU"),
    ],
)
def test_bad_input_is_one_clear_error(case, message, tiny_model_dir, glue_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    write_csv(tmp_path / "train.csv", [("a b", 0), ("c d", 1)], ("text", "label"))
    write_csv(tmp_path / "dev.csv", [("a b", "x", 0)], ("text", "other", "label"))
    args = {
        "unknown_task": ["--task_name", "sst3"],
        "mismatched_columns": ["--train_file", tmp_path / "train.csv", "--validation_file", tmp_path / "dev.csv"],
        "mixed_formats": ["--train_file", tmp_path / "train.csv", "--validation_file", tmp_path / "dev.json"],
        "budget_too_small": ["--task_name", "sst2", "--glue_dir", glue_dir, "--lora_budget", "0.001"],
        "offline_model": ["--task_name", "sst2", "--glue_dir", glue_dir],
        "missing_glue_file": ["--task_name", "cola", "--glue_dir", glue_dir],
        "fp16_on_cpu": ["--task_name", "sst2", "--glue_dir", glue_dir, "--fp16"],
    }[case]
    model = tiny_model_dir
    if case == "offline_model":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        model = "no-such-org/no-such-model"
    base = common(model, out)
    base.remove("--lora_r"), base.remove("4")
    assert run([*base, *args]) == 2
    stderr = capsys.readouterr().err
    error = stderr.split("\nerror: ")[-1] if "\nerror: " in stderr else stderr.removeprefix("error: ")
    assert stderr.startswith("error: ") or "\nerror: " in stderr
    assert message in error and "Traceback" not in stderr and len(error.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())
