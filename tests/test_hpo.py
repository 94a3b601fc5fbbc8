"""Hyper-parameter search through `run_glue_fw.py --hpo_trials` (Optuna) on a tiny BERT."""

import json

import pytest
from tiny_glue_runs import common, glue_dir, run, tiny_model_dir  # noqa: F401  (module-scoped fixtures)


pytest.importorskip("optuna")

# The tiny BERT's 12 default targets: per layer query, key, value, attention output (32 → 32), FFN in (32 → 48),
# FFN out (48 → 32); a rank-r adapter on d_out × d_in has r (d_in + d_out) parameters. The head is Linear(32, 2).
ADAPTER_PARAMS_PER_RANK = 2 * (4 * (32 + 32) + 2 * (32 + 48))
HEAD_PARAMS = 32 * 2 + 2


def test_two_trials_search_the_method_arguments_too(tiny_model_dir, glue_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "hpo"
    args = common(tiny_model_dir, out, "--task_name", "sst2", "--glue_dir", glue_dir, "--method", "fw_lora")
    extra = ["--hpo_trials", "2", "--eval_strategy", "steps", "--eval_steps", "6", "--report_to", "none"]
    assert run([*args, *extra]) == 0

    results = json.loads((out / "hpo_results.json").read_text())
    assert results["objective"] == "eval_accuracy" and results["direction"] == "maximize"
    trials = results["trials"]
    assert [t["number"] for t in trials] == [0, 1]
    for trial in trials:
        params = trial["params"]
        assert set(params) == {
            "learning_rate",
            "per_device_train_batch_size",
            "lora_r",
            "fw_lambda",
            "fw_warmup_steps",
        }
        assert 1e-4 <= params["learning_rate"] <= 3e-4 and 5e-5 <= params["fw_lambda"] <= 5e-4
        assert params["lora_r"] in (4, 8, 16) and params["per_device_train_batch_size"] in (16, 32, 64)
        assert 300 <= params["fw_warmup_steps"] <= 800
        # The method's arguments reached the trial: its model has the trial's rank, its callback the trial's K and λ.
        used = trial["method_arguments"]
        assert (used["lora_r"], used["fw_lambda"], used["fw_warmup_steps"]) == (
            params["lora_r"], params["fw_lambda"], params["fw_warmup_steps"],
        )  # fmt: skip
        assert trial["trainable_params"] == params["lora_r"] * ADAPTER_PARAMS_PER_RANK + HEAD_PARAMS
        assert trial["global_step"] == 12 and 0.0 <= trial["objective"] <= 1.0
    best = max(trials, key=lambda t: t["objective"])
    assert results["best_trial"]["objective"] == best["objective"]
    assert "Best of 2 trials" in capsys.readouterr().out


def test_search_needs_evaluations(tiny_model_dir, glue_dir, tmp_path, capsys):  # noqa: F811
    args = common(tiny_model_dir, tmp_path / "x", "--task_name", "sst2", "--glue_dir", glue_dir, "--hpo_trials", "2")
    assert run(args) == 2
    assert "--eval_strategy" in capsys.readouterr().err
