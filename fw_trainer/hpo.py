"""
Hyper-parameter search with Optuna through `Trainer.hyperparameter_search`, over the FW-LoRA paper's space.
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    import optuna

    from .trainer import FWLoraTrainer


HPO_RESULTS_FILE = "hpo_results.json"


@dataclass
class HyperparameterSearchArguments:
    """The search options of `run_glue_fw.py`."""

    hpo_trials: int = field(
        default=0,
        metadata={
            "help": "Run an Optuna search of this many trials (0: no search) over learning rate, rank, batch size and, "
            "for FW-LoRA, fw_lambda and fw_warmup_steps, optimising the last dev evaluation of each trial; writes "
            "hpo_results.json and trains no final model (rerun with the best parameters). Needs `pip install optuna`."
        },
    )
    hpo_sampler_seed: int = field(default=42, metadata={"help": "Seed of Optuna's TPE sampler."})

    def __post_init__(self):
        if self.hpo_trials < 0:
            raise ValueError(f"`hpo_trials` should be >= 0, but the value passed is {self.hpo_trials}.")


def hp_space_for(method: str) -> Callable[["optuna.Trial"], dict[str, Any]]:
    """
    The FW-LoRA paper's search space: learning rate 1e-4–3e-4 (log), rank {4, 8, 16}, batch size {16, 32, 64} and, for
    the Fisher-weighted methods, `fw_lambda` 5e-5–5e-4 (log) and `fw_warmup_steps` 300–800 (full fine-tuning: the
    learning rate and batch size only).
    """

    def hp_space(trial: "optuna.Trial") -> dict[str, Any]:
        params = {
            "learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-4, log=True),
            "per_device_train_batch_size": trial.suggest_categorical("per_device_train_batch_size", [16, 32, 64]),
        }
        if method != "full":
            params["lora_r"] = trial.suggest_categorical("lora_r", [4, 8, 16])
        if method in ("fw_lora", "iw_lora"):
            params["fw_lambda"] = trial.suggest_float("fw_lambda", 5e-5, 5e-4, log=True)
            params["fw_warmup_steps"] = trial.suggest_int("fw_warmup_steps", 300, 800)
        return params

    return hp_space


def run_hyperparameter_search(
    trainer: "FWLoraTrainer", args: HyperparameterSearchArguments, objective_metric: str, output_dir: str
) -> dict[str, Any]:
    """
    Runs the search and writes `hpo_results.json` (the best trial and every trial) into `output_dir`.

    Args:
        trainer ([`FWLoraTrainer`]): With a `model_init` that builds the model from `trainer.fw_args`, and evaluations
            during training (the objective is the last one).
        args ([`HyperparameterSearchArguments`]): The number of trials and the sampler's seed.
        objective_metric (`str`): The evaluation key to optimise, e.g. `eval_accuracy` (maximised; a loss or an MSE is
            minimised).
        output_dir (`str`): Where the results file goes (each trial's checkpoints go to `run-<trial>` below it).
    """
    import optuna

    direction = "minimize" if objective_metric.endswith(("loss", "mse")) else "maximize"

    def compute_objective(metrics: dict[str, float]) -> float:
        return metrics[objective_metric]

    best = trainer.hyperparameter_search(
        hp_space=hp_space_for(trainer.fw_args.method),
        compute_objective=compute_objective,
        n_trials=args.hpo_trials,
        direction=direction,
        backend="optuna",
        sampler=optuna.samplers.TPESampler(seed=args.hpo_sampler_seed),
    )
    results = {
        "objective": objective_metric,
        "direction": direction,
        "best_trial": {"number": int(best.run_id), "objective": best.objective, "params": best.hyperparameters},
        "trials": trainer.hpo_trials,
    }
    if trainer.is_world_process_zero():
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, HPO_RESULTS_FILE), "w") as f:
            json.dump(results, f, indent=2)
    return results
