"""
The files a run writes into its output directory (and its checkpoints): their names, the writers of those that
`run_glue_fw.py` adds to run_glue's outputs, and [`read_run_artifacts`], which reads a finished run back for the study
harness. The callbacks write their own files under the names given here.
"""

import json
import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from torch import nn
from transformers.trainer import TRAINER_STATE_NAME

from .adapted_matrices import delta_weight_norms
from .errors import CheckpointError


if TYPE_CHECKING:
    from .fisher_callback import FisherWarmupCallback
    from .model_builder import AdapterSummary


# Written by the Fisher warm-up callback into the output directory and every checkpoint.
IMPORTANCE_FILE = "fw_importance.json"
# What the run is (base model, task, method and its arguments, ...), written by the trainer into the output directory
# and every checkpoint, and compared with the run asked for on resume: [`run_identity`].
RUN_IDENTITY_FILE = "fw_run_identity.json"
# Written by the AdaLoRA callback at the end of training.
RANK_PATTERN_FILE = "adalora_rank_pattern.json"
# What was adapted and how many parameters it took: [`write_adapter_summary`].
ADAPTER_SUMMARY_FILE = "adapter_summary.json"
# ‖ΔW‖_F per adapted matrix at the end of training, where each method put its capacity: [`write_delta_weight_norms`].
DELTA_WEIGHT_NORMS_FILE = "delta_weight_norms.json"
# Per dev example: index, gold label id (or score) and prediction of the final model, for McNemar's test and the
# confusion matrix: [`write_eval_predictions`].
EVAL_PREDICTIONS_FILE = "eval_predictions_{task}.tsv"
# transformers' `save_metrics("all", ...)`: written last, so its presence marks a finished run.
ALL_RESULTS_FILE = "all_results.json"
# transformers' `save_state()`: the log history, among others.
TRAINER_STATE_FILE = TRAINER_STATE_NAME


def write_json_atomic(path: str, data: Any) -> None:
    """
    Writes `data` as JSON to a temporary file beside `path`, flushed to disk, then renames it over `path`: readers (and
    a resume) see the old file or the whole new one, never half of it, even if the process is killed mid-write.

    Args:
        path (`str`): The file to write; its directory is created if needed.
        data (`Any`): A JSON-serialisable value.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".tmp-", suffix=".json", delete=False) as f:
        try:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            # A value that is not JSON-serialisable (or a full disk) leaves no stray temporary file behind.
            f.close()
            os.unlink(f.name)
            raise
    os.replace(f.name, path)


def read_state_file(path: str, problem: Optional[Callable[[Any], Optional[str]]] = None) -> Any:
    """
    Reads a JSON state file from a checkpoint (`fw_importance.json`, `fw_run_identity.json`), for a resume.

    Args:
        path (`str`): The file.
        problem (`Callable`, *optional*): What makes the content unusable, or `None` when it is fine.

    Raises:
        `CheckpointError`: If the file is not valid JSON (a damaged file), or `problem` names a problem.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        found = f"not valid JSON ({error})"
    else:
        found = problem(data) if problem is not None else None
    if found is not None:
        raise CheckpointError(
            f"{path} is damaged or inconsistent: {found}. Resume from an earlier checkpoint, or start a new run "
            "instead of resuming."
        )
    return data


def _read_json(path: str) -> Optional[Any]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


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
    with open(path, "w") as writer:
        writer.write("index\tlabel\tprediction\n")
        for index, (label, prediction) in enumerate(zip(label_ids, predictions)):
            if is_regression:
                writer.write(f"{index}\t{label:.6g}\t{prediction:.6g}\n")
            else:
                writer.write(f"{index}\t{int(label)}\t{int(prediction)}\n")


def print_report(eval_metrics: dict[str, Any], fisher_callback: Optional["FisherWarmupCallback"] = None) -> None:
    """Prints the dev metrics and, when the run froze importances (FW-LoRA, IW-LoRA), the importance table."""
    shown = {
        k: v
        for k, v in eval_metrics.items()
        if k.startswith("eval_") and isinstance(v, float) and not k.endswith(("_per_second", "runtime"))
    }
    if shown:
        print("\nDev metrics: " + ", ".join(f"{k} = {v:.4f}" for k, v in shown.items()))
    if fisher_callback is not None and fisher_callback.frozen:
        table = fisher_callback.format_table()
        print(f"\nFW-LoRA importances (frozen at step {fisher_callback.frozen_at_step}):\n{table}")


def is_finished_run(output_dir: str) -> bool:
    """Whether `output_dir` holds a finished run (its `all_results.json`, the last file a run writes)."""
    return os.path.isfile(os.path.join(output_dir, ALL_RESULTS_FILE))


def read_run_artifacts(run_dir: str) -> dict[str, Any]:
    """
    Reads back what a run wrote into its output directory, as written (no GLUE knowledge: the study derives its
    metrics from this).

    Args:
        run_dir (`str`): A `run_glue_fw.py --output_dir`.

    Returns:
        `dict`: `all_results` (`all_results.json`), `trainer_state` (`trainer_state.json`), `importance`
        (`fw_importance.json`, with `frozen_at_step`), `adapter_summary` (`adapter_summary.json`),
        `delta_weight_norms` (`delta_weight_norms.json`), each `None` when the run did not write it, and
        `eval_predictions`: the names of its `eval_predictions_{task}.tsv` files, sorted.
    """
    prefix, suffix = EVAL_PREDICTIONS_FILE.split("{task}")
    return {
        "all_results": _read_json(os.path.join(run_dir, ALL_RESULTS_FILE)),
        "trainer_state": _read_json(os.path.join(run_dir, TRAINER_STATE_FILE)),
        "importance": _read_json(os.path.join(run_dir, IMPORTANCE_FILE)),
        "adapter_summary": _read_json(os.path.join(run_dir, ADAPTER_SUMMARY_FILE)),
        "delta_weight_norms": _read_json(os.path.join(run_dir, DELTA_WEIGHT_NORMS_FILE)),
        "eval_predictions": sorted(f for f in os.listdir(run_dir) if f.startswith(prefix) and f.endswith(suffix)),
    }
