"""
Hyper-parameter search with Optuna through `Trainer.hyperparameter_search`, over the FW-LoRA paper's space: the
training arguments through `hp_space`, the method's arguments through `model_init(trial)` (no private Trainer hook).
"""

import dataclasses
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

from ..arguments import FISHER_WEIGHTED_METHODS, FWLoraArguments
from ..errors import UsageError


if TYPE_CHECKING:
    import optuna

    from ..trainer import FWLoraTrainer


HPO_RESULTS_FILE = "hpo_results.json"


def training_space(trial: "optuna.Trial") -> dict[str, Any]:
    """The `TrainingArguments` part of the FW-LoRA paper's space: learning rate 1e-4–3e-4 (log), batch size {16, 32,
    64}. It is the `hp_space` handed to `Trainer.hyperparameter_search`, which sets it on the trial's arguments."""
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-4, log=True),
        "per_device_train_batch_size": trial.suggest_categorical("per_device_train_batch_size", [16, 32, 64]),
    }


def method_space(trial: "optuna.Trial", method: str) -> dict[str, Any]:
    """The method's part of the space (`FWLoraArguments` fields): rank {4, 8, 16} and, for the Fisher-weighted methods,
    `fw_lambda` 5e-5–5e-4 (log) and `fw_warmup_steps` 300–800. Full fine-tuning has none. Suggested by `model_init`,
    which builds the trial's model from them."""
    params = {}
    if method != "full":
        # A rank given by the search replaces a budget.
        params.update(lora_r=trial.suggest_categorical("lora_r", [4, 8, 16]), lora_budget=None)
    if method in FISHER_WEIGHTED_METHODS:
        params["fw_lambda"] = trial.suggest_float("fw_lambda", 5e-5, 5e-4, log=True)
        params["fw_warmup_steps"] = trial.suggest_int("fw_warmup_steps", 300, 800)
    return params


def run_hyperparameter_search(
    trainer: "FWLoraTrainer",
    build_model: Callable[[FWLoraArguments], nn.Module],
    n_trials: int,
    objective_metric: str,
    output_dir: str,
    sampler_seed: int = 42,
) -> dict[str, Any]:
    """
    Runs the search and writes `hpo_results.json` (the best trial and every trial) into `output_dir`.

    Each trial's `model_init(trial)` suggests the method's arguments ([`method_space`]), hands them to the trainer
    ([`FWLoraTrainer.set_method_arguments`]) and builds the model from them; `Trainer.hyperparameter_search` sets the
    training arguments ([`training_space`]). The objective function records each trial as it is scored.

    Args:
        trainer ([`FWLoraTrainer`]): With evaluations during training (the objective is the last one).
        build_model (`Callable[[FWLoraArguments], nn.Module]`): A fresh model adapted for the given method arguments.
        n_trials (`int`): The number of trials.
        objective_metric (`str`): The evaluation key to optimise, e.g. `eval_accuracy` (maximised; a loss or an MSE is
            minimised).
        output_dir (`str`): Where the results file goes (each trial's checkpoints go to `run-<trial>` below it).
        sampler_seed (`int`, *optional*, defaults to `42`): The seed of Optuna's TPE sampler.

    Raises:
        `UsageError`: If Optuna is not installed.
    """
    try:
        import optuna
    except ImportError as error:
        raise UsageError("--hpo_trials needs Optuna: `pip install optuna` (or `pip install fw-lora[hpo]`).") from error

    direction = "minimize" if objective_metric.endswith(("loss", "mse")) else "maximize"
    base_arguments = trainer.fw_args
    trials: dict[int, dict[str, Any]] = {}
    current: dict[str, Any] = {}

    def model_init(trial: Optional["optuna.Trial"] = None) -> nn.Module:
        if trial is None:  # outside a trial
            return build_model(trainer.fw_args)
        current["trial"] = trial
        trainer.set_method_arguments(dataclasses.replace(base_arguments, **method_space(trial, base_arguments.method)))
        return build_model(trainer.fw_args)

    def compute_objective(metrics: dict[str, float]) -> float:
        # Called at every evaluation of a trial: its record ends with the last one.
        trial = current["trial"]
        trials[trial.number] = {
            "number": trial.number,
            "params": dict(trial.params),
            "objective": metrics[objective_metric],
            "method_arguments": dataclasses.asdict(trainer.fw_args),
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "global_step": trainer.state.global_step,
        }
        return metrics[objective_metric]

    trainer.model_init = model_init
    best = trainer.hyperparameter_search(
        hp_space=training_space,
        compute_objective=compute_objective,
        n_trials=n_trials,
        direction=direction,
        backend="optuna",
        sampler=optuna.samplers.TPESampler(seed=sampler_seed),
    )
    results = {
        "objective": objective_metric,
        "direction": direction,
        "best_trial": {"number": int(best.run_id), "objective": best.objective, "params": best.hyperparameters},
        "trials": [trials[number] for number in sorted(trials)],
    }
    if trainer.is_world_process_zero():
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, HPO_RESULTS_FILE), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results
