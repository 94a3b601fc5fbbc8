"""The FW-LoRA warm-up schedule in a `Trainer`: measure `F_m` for K steps, then freeze the importances `I_m`."""

import logging
import math
import os
import warnings
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .adapted_matrices import AdaptedMatrix
from .errors import CheckpointError, RunMismatchError, WarmupDivergedError
from .fisher_estimator import FisherEstimator
from .importance import normalize_importances
from .run_artifacts import IMPORTANCE_FILE, read_state_file, write_json_atomic


logger = logging.getLogger(__name__)

# The keys of `fw_importance.json` ([`FisherWarmupCallback.state_dict`]) and of each entry of its `modules`.
_STATE_KEYS = (
    "frozen",
    "frozen_at_step",
    "warmup_steps",
    "ema_decay",
    "normalization",
    "statistic",
    "average",
    "power",
    "estimator",
    "num_updates",
    "modules",
)
_MODULE_KEYS = ("fisher", "importance", "penalty_weight", "d_out", "d_in", "r", "running_state")


class FisherWarmupCallback(TrainerCallback):
    r"""
    Runs a [`FisherEstimator`] during the first `warmup_steps` optimizer steps, then freezes the normalised importances
    `I_m` (see [`normalize_importances`]) and removes the estimator's hooks (no cost afterwards). Training that ends
    before step K freezes at the end, with a warning. The importances are logged as a table and written, with the
    running state, to `fw_importance.json` in the output directory and every checkpoint ([`save`], [`load`]).

    When training begins, `estimator` becomes the [`FisherEstimator`] of the model being trained (the arguments below
    named after its options are passed on to it). The training loss must reach `backward()` through
    `estimator.loss_to_backpropagate` while [`is_measuring`]: [`FWLoraTrainer`] does it in `compute_loss`. With
    `warmup_mode="calibrate"` (IW-LoRA) the callback measures nothing during training: [`FWLoraTrainer`] runs the K
    calibration steps with the estimator before the first training step, then calls [`freeze`].

    Args:
        warmup_steps (`int`): Number K of optimizer (or calibration) steps of measurement.
        ema_decay (`float`, *optional*, defaults to `0.98`): Decay α of the moving average.
        normalization (`str`, *optional*, defaults to `"sum"`): `"sum"` (`I = F / ΣF`) or `"max"` (`I = F / max F`).
        statistic (`str`, *optional*, defaults to `"sq_norm"`): `"sq_norm"` (`‖∇W‖²`) or `"norm"` (`‖∇W‖`).
        average (`str`, *optional*, defaults to `"ema"`): `"ema"` or `"mean"`.
        power (`float`, *optional*, defaults to `1.0`): Exponent β of the penalty weights `(1 − I)^β`.
        estimator (`str`, *optional*, defaults to `"auto"`):
            `"auto"`, `"exact"` or `"sketch"` (see [`FisherEstimator`]); the sketch's probes come from a generator of its own seeded with `args.seed`.
        sketch_probes (`int`, *optional*, defaults to `8`): Number `k` of probes of the sketch.
        warmup_mode (`str`, *optional*, defaults to `"train"`):
            `"train"`: measure during the first K training steps. `"calibrate"`: the trainer measures in a calibration
            before training.
        adapter_name (`str`, *optional*, defaults to `"default"`): The LoRA adapter whose matrices are measured.
    """

    def __init__(
        self,
        warmup_steps: int,
        ema_decay: float = 0.98,
        normalization: str = "sum",
        statistic: str = "sq_norm",
        average: str = "ema",
        power: float = 1.0,
        estimator: str = "auto",
        sketch_probes: int = 8,
        warmup_mode: str = "train",
        adapter_name: str = "default",
    ):
        self.warmup_steps = warmup_steps
        self.normalization = normalization
        self.power = power
        self.warmup_mode = warmup_mode
        self._estimator_options = {
            "statistic": statistic,
            "average": average,
            "ema_decay": ema_decay,
            "estimator": estimator,
            "sketch_probes": sketch_probes,
            "adapter_name": adapter_name,
        }
        self.estimator: Optional[FisherEstimator] = None  # built for the model when training begins
        self.fisher: Optional[torch.Tensor] = None  # F, set when frozen
        self.importances: Optional[torch.Tensor] = None  # I, set when frozen
        self.frozen_at_step: Optional[int] = None
        self._state_to_restore: Optional[dict] = None

    # ----- state ------------------------------------------------------------------------------------------------

    @property
    def matrices(self) -> Optional[list[AdaptedMatrix]]:
        """The adapted matrices, in the order of `fisher` and `importances` (once training has begun)."""
        return self.estimator.matrices if self.estimator is not None else None

    @property
    def frozen(self) -> bool:
        """Whether the importances are frozen (the warm-up is over)."""
        return self.importances is not None

    @property
    def is_measuring(self) -> bool:
        """Whether the estimator's hooks are installed (during the warm-up only)."""
        return self.estimator is not None and self.estimator.is_measuring

    @property
    def awaits_calibration(self) -> bool:
        """Whether the trainer has yet to run the calibration (`warmup_mode="calibrate"`, set up, not frozen)."""
        return self.warmup_mode == "calibrate" and self.estimator is not None and not self.frozen

    @property
    def penalty_weights(self) -> torch.Tensor:
        """`(1 − I_m)^β` for every adapted matrix, once frozen."""
        if not self.frozen:
            raise RuntimeError("The importances are not frozen yet: the Fisher warm-up is still running.")
        return (1.0 - self.importances).pow(self.power)

    def _setup(self, model: nn.Module, seed: int) -> None:
        """A new estimator for `model`, from an empty estimate (a new model is a new run)."""
        if self.estimator is not None:
            self.estimator.stop()
        self.fisher = self.importances = self.frozen_at_step = None
        self.estimator = FisherEstimator(model, seed=seed, **self._estimator_options)

    @torch.no_grad()
    def freeze(self, args: TrainingArguments, state: TrainerState) -> None:
        """
        Ends the warm-up: removes the hooks, reads `F` and normalises it into `I`; on the main process, logs the table
        and writes `fw_importance.json` into `args.output_dir`.

        A step in which no micro-batch was finite (a NaN or infinite loss or gradient: a learning rate that diverges,
        an fp16 overflow) is left out of `F`, and a warning says how many were. If no step of the warm-up was finite,
        `F` is empty and any importances frozen from it would mean nothing (a zero `F` would silently fall back to
        uniform ones): the freeze refuses, and training stops.

        Raises:
            `WarmupDivergedError`: If the warm-up measured steps but none of them had a finite micro-batch.
        """
        self.estimator.stop()
        measured = self.warmup_steps if self.warmup_mode == "calibrate" else min(state.global_step, self.warmup_steps)
        # The freeze's one extra host read: how many measured steps had a finite micro-batch.
        finite = int(self.estimator.state_dict()["num_updates"].item())
        what = "IW-LoRA calibration" if self.warmup_mode == "calibrate" else "FW-LoRA warm-up"
        if measured > 0 and finite == 0:
            raise WarmupDivergedError(
                f"The {what} saw no finite gradient: in each of its {measured} steps the loss or the gradient of every "
                "micro-batch was NaN or infinite, so there is nothing to compute importances from. The model diverged "
                "or computes NaN from the start: check its weights and lower the learning rate"
                + (", or train in bf16 or fp32 instead of fp16" if args.fp16 else "")
                + ". Training stops here rather than go on with meaningless importances."
            )
        if finite < measured:
            logger.warning(
                "%d of the %d steps of the %s had no finite micro-batch (a NaN or infinite loss or gradient: is the "
                "learning rate too high?); the importances come from the other %d.",
                measured - finite,
                measured,
                what,
                finite,
            )
        self.fisher = self.estimator.fisher
        self.importances = normalize_importances(self.fisher, self.normalization).to(self.fisher.device)
        self.frozen_at_step = state.global_step
        if state.is_world_process_zero:
            logger.info("FW-LoRA importances frozen at step %d:\n%s", state.global_step, self.format_table())
            self.save(args.output_dir)

    # ----- Trainer events ---------------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = kwargs["model"]
        # A Trainer with `model_init` (hyper-parameter search) brings a new model to every `train()` call.
        if self.estimator is None or not any(module is self.matrices[0].layer for module in model.modules()):
            self._setup(model, args.seed)
        if self._state_to_restore is not None:
            self._apply_state(self._state_to_restore)
            self._state_to_restore = None
        if self.frozen or self.warmup_mode == "calibrate":
            return
        if state.global_step >= self.warmup_steps:
            self.freeze(args, state)
        else:
            logger.info(
                "FW-LoRA warm-up: %d optimizer steps, %s Fisher estimator.",
                self.warmup_steps,
                self.estimator.estimator,
            )
            self.estimator.start()

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.is_measuring:
            self.estimator.fold_micro_batch()

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.is_measuring:
            self.estimator.fold_micro_batch()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not self.is_measuring:
            return
        self.estimator.end_step()
        if state.global_step >= self.warmup_steps:
            self.freeze(args, state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.estimator is not None and not self.frozen:
            warnings.warn(
                f"Training ended after {state.global_step} optimizer steps, before the FW-LoRA warm-up of "
                f"{self.warmup_steps} steps finished: the importances are frozen now from the steps seen, and the "
                "penalty was never applied. Lower `fw_warmup_steps` or train longer.",
                stacklevel=2,
            )
            self.freeze(args, state)

    # ----- persistence ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """A JSON-serialisable description of the estimate: module name → F, I, 1 − I, d_out, d_in, r, and the
        running state needed to resume mid-warm-up."""
        if self.estimator is None:
            raise RuntimeError("FisherWarmupCallback has no statistics yet: it is set up when training begins.")
        # One device-to-host copy per vector (not one per matrix): this runs at the freeze and at checkpoints only.
        num_matrices = len(self.matrices)
        running_state = self.estimator.state_dict()
        fisher = (self.fisher if self.frozen else self.estimator.fisher).tolist()
        importances = self.importances.tolist() if self.frozen else [None] * num_matrices
        penalty_weights = self.penalty_weights.tolist() if self.frozen else [None] * num_matrices
        running = running_state["running"].tolist()
        modules = {}
        for index, matrix in enumerate(self.matrices):
            modules[matrix.name] = {
                "fisher": fisher[index],
                "importance": importances[index],
                "penalty_weight": penalty_weights[index],
                "d_out": matrix.d_out,
                "d_in": matrix.d_in,
                "r": matrix.r,
                "running_state": running[index],
            }
        return {
            "frozen": self.frozen,
            "frozen_at_step": self.frozen_at_step,
            "warmup_steps": self.warmup_steps,
            "ema_decay": self.estimator.ema_decay,
            "normalization": self.normalization,
            "statistic": self.estimator.statistic,
            "average": self.estimator.average,
            "power": self.power,
            "estimator": self.estimator.estimator,
            "num_updates": int(running_state["num_updates"].item()),
            "modules": modules,
        }

    def save(self, output_dir: str) -> None:
        """Writes [`state_dict`] to `output_dir/fw_importance.json`, atomically: a save interrupted at any moment
        leaves the previous file or none, never a damaged one."""
        if self.estimator is None:
            return
        write_json_atomic(os.path.join(output_dir, IMPORTANCE_FILE), self.state_dict())

    def load(self, checkpoint_dir: str, matrix_names: Optional[list[str]] = None) -> None:
        """
        Reads the state saved in a checkpoint ([`state_dict`]), checked, to be applied when training begins.

        Args:
            checkpoint_dir (`str`): The checkpoint to resume from.
            matrix_names (`list[str]`, *optional*):
                The names of the adapted matrices of the model being trained, in order: the saved state must list the
                same. Without them, they are compared when training begins.

        Raises:
            `CheckpointError`: If the checkpoint has no `fw_importance.json` (every checkpoint of an FW-LoRA or
                IW-LoRA run has one), or the file is damaged (not valid JSON) or inconsistent (unknown or missing
                keys, values of the wrong type, other adapted matrices than `matrix_names`).
            `RunMismatchError`: If the state was measured with other warm-up options (K, the average, ...; not the
                estimator, which may be chosen by device, see [`run_identity`] for the argument).
        """
        path = os.path.join(checkpoint_dir, IMPORTANCE_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(
                f"The checkpoint {checkpoint_dir} has no {IMPORTANCE_FILE}, which every checkpoint of an FW-LoRA or "
                "IW-LoRA run holds: it was written by another method, or its save was interrupted. Resume from a "
                "checkpoint of this run, or with the method it was trained with."
            )
        state = read_state_file(path, lambda state: _state_problem(state, matrix_names))
        differences = [
            (f"fw_{name}", state[name], value)
            for name, value in self._measurement_options().items()
            if state[name] != value
        ]
        if differences:
            raise RunMismatchError(checkpoint_dir, differences)
        self._state_to_restore = state

    def _measurement_options(self) -> dict[str, Any]:
        """The options that define the measured statistics, by their names in [`state_dict`]."""
        return {
            "warmup_steps": self.warmup_steps,
            "ema_decay": self._estimator_options["ema_decay"],
            "normalization": self.normalization,
            "statistic": self._estimator_options["statistic"],
            "average": self._estimator_options["average"],
            "power": self.power,
        }

    def _apply_state(self, state: dict) -> None:
        problem = _state_problem(state, [matrix.name for matrix in self.matrices])
        if problem is not None:
            raise CheckpointError(
                f"The saved FW-LoRA state does not fit the model being trained: {problem}. Resume with the LoRA "
                "targets and rank it was trained with."
            )
        rows = list(state["modules"].values())
        self.estimator.load_state_dict(
            {"running": [row["running_state"] for row in rows], "num_updates": float(state["num_updates"])}
        )
        if state["frozen"]:
            self.estimator.stop()
            like = {"device": self.matrices[0].lora_A.device, "dtype": torch.float32}
            self.fisher = torch.tensor([row["fisher"] for row in rows], **like)
            self.importances = torch.tensor([row["importance"] for row in rows], **like)
            self.frozen_at_step = state["frozen_at_step"]

    def format_table(self) -> str:
        """The importances as a text table, most important first."""
        state = self.state_dict()["modules"]
        rows = sorted(state.items(), key=lambda item: -(item[1]["importance"] or 0.0))
        width = max(len(name) for name in state)
        lines = [f"{'module':<{width}}  {'F':>11}  {'I':>9}  {'1 - I':>9}"]
        for name, row in rows:
            importance = row["importance"] if row["importance"] is not None else float("nan")
            lines.append(f"{name:<{width}}  {row['fisher']:>11.4e}  {importance:>9.5f}  {1 - importance:>9.5f}")
        return "\n".join(lines)


def _state_problem(state: Any, matrix_names: Optional[list[str]]) -> Optional[str]:
    """What makes a state read from `fw_importance.json` unusable for a model with `matrix_names`, or `None`."""
    if not isinstance(state, dict):
        return "it is not a JSON object"
    problem = _keys_problem(state, _STATE_KEYS, "it")
    if problem is not None:
        return problem
    modules, frozen = state["modules"], state["frozen"]
    if not isinstance(modules, dict) or not modules:
        return "`modules` is not a mapping of module names to their statistics"
    if matrix_names is not None and list(modules) != list(matrix_names):
        if len(modules) != len(matrix_names):
            return (
                f"it holds the statistics of {len(modules)} adapted matrices, but the model being trained has "
                f"{len(matrix_names)}"
            )
        saved, name = next((saved, name) for saved, name in zip(modules, matrix_names) if saved != name)
        return f"it lists other adapted matrices than the model being trained ({saved} where the model has {name})"
    if not isinstance(frozen, bool):
        return f"`frozen` is {frozen!r}, not true or false"
    for key in ("num_updates", *(("frozen_at_step",) if frozen else ())):
        if not _is_non_negative(state[key], integer=True):
            return f"`{key}` is {state[key]!r}, not a step count"
    for name, row in modules.items():
        if not isinstance(row, dict):
            return f"its entry {name} is not a mapping"
        problem = _keys_problem(row, _MODULE_KEYS, f"its entry {name}")
        if problem is not None:
            return problem
        for key in ("fisher", "running_state", *(("importance", "penalty_weight") if frozen else ())):
            if not _is_non_negative(row[key]):
                return f"the `{key}` of {name} is {row[key]!r}, not a finite non-negative number"
    return None


def _keys_problem(mapping: dict, keys: tuple[str, ...], what: str) -> Optional[str]:
    unknown, missing = sorted(set(mapping) - set(keys)), [key for key in keys if key not in mapping]
    parts = []
    if unknown:
        parts.append(f"unknown keys {', '.join(unknown)}")
    if missing:
        parts.append(f"no {', '.join(missing)}")
    return f"{what} has {' and '.join(parts)}" if parts else None


def _is_non_negative(value: Any, integer: bool = False) -> bool:
    """Whether `value`, read from JSON, is a finite non-negative number (an integer if `integer`)."""
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
