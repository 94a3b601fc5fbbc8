"""
What the GLUE script writes beside run_glue's files (`adapter_summary.json`, `delta_weight_norms.json`,
`eval_predictions_{task}.tsv`; `run_environment.json` comes from `fw_trainer/run_environment.py`), the names of the
files a finished run holds, and its report on standard output.
"""

import os
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from torch import nn
from transformers.trainer import TRAINER_STATE_NAME

from ..adapted_matrices import delta_weight_norms
from ..state_files import write_json_atomic
from .run_files import ALL_RESULTS_FILE as ALL_RESULTS_FILE  # the files a finished run holds, together


if TYPE_CHECKING:
    from ..model_builder import AdapterSummary


# What was adapted and how many parameters it took: [`write_adapter_summary`].
ADAPTER_SUMMARY_FILE = "adapter_summary.json"
# ‖ΔW‖_F per adapted matrix at the end of training, where each method put its capacity: [`write_delta_weight_norms`].
DELTA_WEIGHT_NORMS_FILE = "delta_weight_norms.json"
# Per dev example: index, gold label id (or score) and prediction of the final model, for McNemar's test and the
# confusion matrix: [`write_eval_predictions`].
EVAL_PREDICTIONS_FILE = "eval_predictions_{task}.tsv"
# transformers' `save_state()`: the log history, among others.
TRAINER_STATE_FILE = TRAINER_STATE_NAME


def write_adapter_summary(output_dir: str, summary: "AdapterSummary") -> None:
    """
    Writes `adapter_summary.json`: the method, the adapted modules, the rank and the parameter counts.

    Args:
        output_dir (`str`): The run's output directory (created if needed).
        summary ([`AdapterSummary`]): What [`build_peft_model`] returned with the model.
    """
    write_json_atomic(os.path.join(output_dir, ADAPTER_SUMMARY_FILE), summary.to_dict())


def write_delta_weight_norms(output_dir: str, model: nn.Module) -> None:
    """
    Writes `delta_weight_norms.json`: `‖ΔW‖_F` of every adapted matrix of a LoRA or AdaLoRA model, by module name (see
    [`delta_weight_norms`]). Call it at the end of training.
    """
    write_json_atomic(os.path.join(output_dir, DELTA_WEIGHT_NORMS_FILE), delta_weight_norms(model))


def write_eval_predictions(
    output_dir: str, task: Optional[str], predictions: np.ndarray, label_ids: np.ndarray, is_regression: bool
) -> None:
    """
    Writes `eval_predictions_{task}.tsv`: index, gold label and prediction of each evaluation example, in dataset
    order.

    Args:
        output_dir (`str`): The run's output directory.
        task (`str`, *optional*): The GLUE task (`mnli-mm` for MNLI's mismatched dev set); `None` names the file
            `eval_predictions_custom.tsv`.
        predictions (`np.ndarray`): A label id per example, or a score for a regression.
        label_ids (`np.ndarray`): The gold label ids, or scores.
        is_regression (`bool`): Scores are written with 6 significant digits, label ids as integers.
    """
    path = os.path.join(output_dir, EVAL_PREDICTIONS_FILE.format(task=task or "custom"))
    with open(path, "w", encoding="utf-8") as writer:
        writer.write("index\tlabel\tprediction\n")
        for index, (label, prediction) in enumerate(zip(label_ids, predictions)):
            if is_regression:
                writer.write(f"{index}\t{label:.6g}\t{prediction:.6g}\n")
            else:
                writer.write(f"{index}\t{int(label)}\t{int(prediction)}\n")


def write_predict_results(
    output_dir: str, task: Optional[str], predictions: np.ndarray, label_list: Optional[list]
) -> None:
    """
    Writes run_glue's `predict_results_{task}.txt`: index and prediction of each test example (a label name, or a
    score with 3 decimals for a regression, i.e. when `label_list` is `None`).
    """
    with open(os.path.join(output_dir, f"predict_results_{task or 'custom'}.txt"), "w", encoding="utf-8") as writer:
        writer.write("index\tprediction\n")
        for index, item in enumerate(predictions):
            writer.write(f"{index}\t{item:3.3f}\n" if label_list is None else f"{index}\t{label_list[item]}\n")


def print_report(
    eval_metrics: dict[str, Any], importance_table: Optional[str] = None, frozen_at_step: Optional[int] = None
) -> None:
    """Prints the dev metrics and, when the run froze importances (FW-LoRA, IW-LoRA), their table."""
    shown = {
        k: v
        for k, v in eval_metrics.items()
        if k.startswith("eval_") and isinstance(v, float) and not k.endswith(("_per_second", "runtime"))
    }
    if shown:
        print("\nDev metrics: " + ", ".join(f"{k} = {v:.4f}" for k, v in shown.items()))
    if importance_table is not None:
        print(f"\nFW-LoRA importances (frozen at step {frozen_at_step}):\n{importance_table}")


def print_search_report(results: dict[str, Any]) -> None:
    """Prints the best trial of a hyper-parameter search ([`run_hyperparameter_search`]'s results) and its parameters
    as flags to rerun with."""
    best, objective = results["best_trial"], results["objective"]
    print(f"\nBest of {len(results['trials'])} trials: #{best['number']}, {objective} = {best['objective']:.4f}")
    print("Parameters: " + ", ".join(f"--{key} {value}" for key, value in best["params"].items()))
