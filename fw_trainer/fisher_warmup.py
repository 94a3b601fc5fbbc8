"""The FW-LoRA warm-up in a `Trainer`, both modes: measure `F_m` for K training steps (or, for IW-LoRA, K calibration
steps before training), freeze the importances `I_m`, save and restore them, and hand the trainer the penalty."""

import logging
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .adapted_matrices import AdaptedMatrix, find_adapted_matrices
from .arguments import FWLoraArguments
from .compilation import compile_backend
from .errors import CheckpointError, WarmupDivergedError
from .fisher_estimator import FisherEstimator
from .importance import exempt_largest, normalize_importances, penalty_weights, shuffled
from .importance_file import ADDED_KEYS, IMPORTANCE_SCHEMA, RECORDED_OPTIONS, format_importance_table, state_problem
from .penalty import FisherWeightedPenalty
from .state_files import (
    IMPORTANCE_FILE,
    read_state_file,
    write_json_atomic,
)


logger = logging.getLogger(__name__)


class FisherWarmupCallback(TrainerCallback):
    r"""
    The warm-up of FW-LoRA and IW-LoRA, its one owner: it runs a [`FisherEstimator`] during the first `fw_warmup_steps`
    optimizer steps (`fw_warmup_mode="train"`) or during as many calibration steps before training
    (`"calibrate"`, IW-LoRA: see [`calibrate`]), then freezes the normalised importances `I_m` (see
    [`normalize_importances`]) and removes the estimator's hooks (no cost afterwards). Training that ends before step K
    freezes at the end, with a warning. The importances are logged as a table and written, with the running state, to
    `fw_importance.json` in the output directory and every checkpoint ([`save`]), from which a resume restores them
    ([`check_resume`]).

    A trainer talks to it through these calls only (as [`FWLoraTrainer`] does):

    - [`loss_to_backpropagate`]: the training loss goes through it before `backward()`, so that the measurement
      can undo what scales the loss afterwards (gradient accumulation, an fp16 loss scale);
    - [`awaits_calibration`] and [`calibrate`]: IW-LoRA's calibration, before the first training step;
    - [`penalty`]: the [`FisherWeightedPenalty`] with the frozen weights `(1 − I_m)^β`, or `None` during the warm-up;
    - [`importances_to_log`]: the frozen importances, once, for the logs; `on_freeze` (given to the constructor) is
      called at every freeze, so that the trainer logs them then;
    - [`check_resume`] before resuming, [`save`] with every checkpoint, and [`stop`] when training dies.

    When training begins, `estimator` becomes the [`FisherEstimator`] of the model being trained, built from `fw_args`;
    the sketch's probes come from a generator of its own seeded with `args.seed`.

    Args:
        fw_args ([`FWLoraArguments`]): The method's arguments (`fw_*`).
        adapter_name (`str`, *optional*): The LoRA adapter whose matrices are measured; defaults to the active one.
        on_freeze (`Callable[[], None]`, *optional*):
            Called when the importances freeze (after the table is logged and `fw_importance.json` written):
            [`FWLoraTrainer`] reports them to every logging integration there and then.
    """

    def __init__(
        self,
        fw_args: FWLoraArguments,
        adapter_name: Optional[str] = None,
        on_freeze: Optional[Callable[[], None]] = None,
    ):
        self.fw_args = fw_args
        self.adapter_name = adapter_name
        self.on_freeze = on_freeze
        self.estimator: Optional[FisherEstimator] = None  # built for the model when training begins
        self.fisher: Optional[torch.Tensor] = None  # F, set when frozen
        self.importances: Optional[torch.Tensor] = None  # I, set when frozen
        self.frozen_at_step: Optional[int] = None
        self._penalty: Optional[FisherWeightedPenalty] = None  # built at the freeze
        self._logged = False  # whether `importances_to_log` gave the frozen importances
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
        """Whether the trainer has yet to run [`calibrate`] (`fw_warmup_mode="calibrate"`, set up, not frozen)."""
        return self.fw_args.fw_warmup_mode == "calibrate" and self.estimator is not None and not self.frozen

    @property
    def penalty_weights(self) -> torch.Tensor:
        """`(1 − I_m)^β` for every adapted matrix, once frozen; 0 for the `fw_exempt_top` matrices of largest F."""
        if not self.frozen:
            raise RuntimeError("The importances are not frozen yet: the Fisher warm-up is still running.")
        weights = penalty_weights(self.importances, self.fw_args.fw_power)
        return exempt_largest(weights, self.fisher.to(weights.device), self.fw_args.fw_exempt_top)

    @property
    def penalty(self) -> Optional[FisherWeightedPenalty]:
        """The penalty `Σ_m (1 − I_m)^β P_m` of the frozen importances (`fw_penalty`), with its strength `λ`
        (`fw_lambda`), built once per freeze; `None` until the importances are frozen."""
        if not self.frozen:
            return None
        if self._penalty is None:
            self._penalty = FisherWeightedPenalty(
                self.matrices, self.penalty_weights, self.fw_args.fw_penalty, self.fw_args.fw_lambda
            )
        return self._penalty

    def importances_to_log(self) -> Optional[dict[str, float]]:
        """The frozen importances by matrix name the first time it is called after the freeze, else `None`: what a
        training log reports once."""
        if not self.frozen or self._logged:
            return None
        self._logged = True
        return dict(zip((matrix.name for matrix in self.matrices), self.importances.tolist()))

    def _setup(self, model: nn.Module, args: TrainingArguments) -> None:
        """A new estimator for `model`, from an empty estimate (every training attempt starts clean); its arithmetic
        compiled with the model under `--torch_compile`."""
        if self.estimator is not None:
            self.estimator.stop()
        self.fisher = self.importances = self.frozen_at_step = self._penalty = None
        self._logged = False
        self.estimator = FisherEstimator.from_args(
            model, self.fw_args, seed=args.seed, adapter_name=self.adapter_name, compile_backend=compile_backend(args)
        )

    def loss_to_backpropagate(self, loss: torch.Tensor, micro_batches: int = 1) -> torch.Tensor:
        """The loss to call `backward()` on: while measuring, `loss` routed through the estimator (see
        [`FisherEstimator.loss_to_backpropagate`], which says what `micro_batches` is); otherwise `loss` itself. Pass
        the task loss alone."""
        return self.estimator.loss_to_backpropagate(loss, micro_batches) if self.is_measuring else loss

    def stop(self) -> None:
        """Removes the estimator's hooks, e.g. when training dies in the warm-up (an error, Ctrl-C in a notebook): they
        must not stay installed, nor compiled code forced to run eagerly (see [`FisherEstimator.start`])."""
        if self.is_measuring:
            self.estimator.stop()

    def calibrate(
        self,
        backward_micro_batch: Callable[[Any], None],
        batches: Iterable,
        args: TrainingArguments,
        state: TrainerState,
    ) -> None:
        """
        IW-LoRA's calibration: `fw_warmup_steps` steps of `args.gradient_accumulation_steps` micro-batches each, from
        the start of `batches` (cycled), measured by the estimator; then the freeze. Nothing is updated: no optimizer
        or scheduler step is taken or counted.

        Args:
            backward_micro_batch (`Callable`):
                Runs the forward and backward pass of one micro-batch, with its loss through [`loss_to_backpropagate`],
                and drops the gradients (the trainer's part: it knows how its model computes the loss).
            batches (`Iterable`): The training batches (the training dataloader).
            args (`TrainingArguments`), state (`TrainerState`): The Trainer's.
        """
        estimator = self.estimator
        estimator.start()
        batch_iterator = iter(())
        for _ in range(self.fw_args.fw_warmup_steps):
            for _ in range(args.gradient_accumulation_steps):
                batch = next(batch_iterator, None)
                if batch is None:  # the data ran out: start it again
                    batch_iterator = iter(batches)
                    batch = next(batch_iterator)
                backward_micro_batch(batch)
                estimator.fold_micro_batch()
            estimator.end_step()
        logger.info("IW-LoRA calibration: %d steps measured, nothing updated.", self.fw_args.fw_warmup_steps)
        self.freeze(args, state)

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
        calibrate = self.fw_args.fw_warmup_mode == "calibrate"
        measured = self.fw_args.fw_warmup_steps if calibrate else min(state.global_step, self.fw_args.fw_warmup_steps)
        # The freeze's one extra host read: how many measured steps had a finite micro-batch.
        finite = int(self.estimator.state_dict()["num_updates"].item())
        what = "IW-LoRA calibration" if calibrate else "FW-LoRA warm-up"
        if measured > 0 and finite == 0:
            raise WarmupDivergedError(
                f"The {what} saw no finite gradient: in each of its {measured} steps the loss or the gradient of "
                "every micro-batch was NaN or infinite, so there is nothing to compute importances from. The model "
                "diverged or computes NaN from the start: check its weights and lower the learning rate"
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
        self.importances = normalize_importances(self.fisher, self.fw_args.fw_normalization).to(self.fisher.device)
        if self.fw_args.fw_shuffle_seed is not None:
            self.importances = shuffled(self.importances, self.fw_args.fw_shuffle_seed)
        self.frozen_at_step = state.global_step
        if state.is_world_process_zero:
            logger.info("FW-LoRA importances frozen at step %d:\n%s", state.global_step, self.format_table())
            self.save(args.output_dir)
        if self.on_freeze is not None:
            self.on_freeze()

    # ----- Trainer events ---------------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Every attempt starts from an empty estimate, or from the checkpoint it resumes: nothing of an attempt that
        # died (an error, Ctrl-C, the out-of-memory retry of `--auto_find_batch_size`) is carried into F.
        self._setup(kwargs["model"], args)
        if self._state_to_restore is not None:
            self._apply_state(self._state_to_restore)
        self._warn_if_plain_lora(state)
        if self.frozen or self.fw_args.fw_warmup_mode == "calibrate":
            return
        if state.global_step >= self.fw_args.fw_warmup_steps:
            self.freeze(args, state)
        else:
            logger.info(
                "FW-LoRA warm-up: %d optimizer steps, %s Fisher estimator.",
                self.fw_args.fw_warmup_steps,
                self.estimator.kind,
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
        if state.global_step >= self.fw_args.fw_warmup_steps:
            self.freeze(args, state)

    def _warn_if_plain_lora(self, state: TrainerState) -> None:
        """At the start: a warm-up that covers the whole run, or `fw_lambda = 0`, makes FW-LoRA plain LoRA."""
        steps, warmup = state.max_steps, self.fw_args.fw_warmup_steps
        reason = None
        if self.fw_args.fw_warmup_mode == "train" and not self.frozen and 0 < steps <= warmup:
            reason = (
                f"its warm-up of {warmup} steps covers the whole run of {steps} optimizer steps, so the penalty never "
                "applies. Lower `fw_warmup_steps` below the run's length, or train longer"
            )
        elif self.fw_args.fw_lambda == 0:
            reason = "`fw_lambda` is 0, so the penalty adds nothing. Give it a positive weight"
        if reason is not None:
            warnings.warn(f"This FW-LoRA run is plain LoRA: {reason}.", stacklevel=2)

    def discard_resume(self) -> None:
        """Forgets the state [`check_resume`] read: the next `train()` is a new run, not that resume."""
        self._state_to_restore = None

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._state_to_restore = None  # restored by every attempt of this training, not by a later one
        if self.estimator is not None and not self.frozen:
            warnings.warn(
                f"Training ended after {state.global_step} optimizer steps, before the FW-LoRA warm-up of "
                f"{self.fw_args.fw_warmup_steps} steps finished: the importances are frozen now from the steps seen, "
                "and the penalty was never applied. Lower `fw_warmup_steps` or train longer.",
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
        weights = self.penalty_weights.tolist() if self.frozen else [None] * num_matrices
        running = running_state["running"].tolist()
        modules = {}
        for index, matrix in enumerate(self.matrices):
            modules[matrix.name] = {
                "fisher": fisher[index],
                "importance": importances[index],
                "penalty_weight": weights[index],
                "d_out": matrix.d_out,
                "d_in": matrix.d_in,
                "r": matrix.r,
                "running_state": running[index],
            }
        return {
            "frozen": self.frozen,
            "frozen_at_step": self.frozen_at_step,
            **self._recorded_options(),
            "estimator": self.estimator.kind,
            "num_updates": int(running_state["num_updates"].item()),
            "modules": modules,
        }

    def save(self, output_dir: str) -> None:
        """Writes [`state_dict`] to `output_dir/fw_importance.json`, atomically: a save interrupted at any moment
        leaves the previous file or none, never a damaged one."""
        if self.estimator is None:
            return
        write_json_atomic(os.path.join(output_dir, IMPORTANCE_FILE), self.state_dict())

    def check_resume(self, checkpoint_dir: str, model: nn.Module) -> None:
        """
        Reads the state saved in a checkpoint ([`state_dict`]), checked against `model`, to be applied when training
        begins. The options it was measured with are not compared here: the run's identity holds every `fw_*` option
        and the trainer compares it first ([`check_run_identity`]).

        Args:
            checkpoint_dir (`str`): The checkpoint to resume from.
            model (`nn.Module`): The model being trained: the saved state must list its adapted matrices, in order.

        Raises:
            `CheckpointError`: If the checkpoint has no `fw_importance.json` (every checkpoint of an FW-LoRA or
                IW-LoRA run has one), or the file is damaged (not valid JSON) or inconsistent (unknown or missing
                keys, values of the wrong type, other adapted matrices than the model's). A file written before an
                option existed lacks its key ([`ADDED_OPTIONS`]) and is read with the option's no-op value.
        """
        path = os.path.join(checkpoint_dir, IMPORTANCE_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(
                f"The checkpoint {checkpoint_dir} has no {IMPORTANCE_FILE}, which every checkpoint of an FW-LoRA or "
                "IW-LoRA run holds: it was written by another method, or its save was interrupted. Resume from a "
                "checkpoint of this run, or with the method it was trained with."
            )
        names = [matrix.name for matrix in find_adapted_matrices(model, self.adapter_name)]
        self._state_to_restore = read_state_file(
            path, IMPORTANCE_SCHEMA, lambda state: state_problem(state, names), added_keys=ADDED_KEYS
        )

    def _recorded_options(self) -> dict[str, Any]:
        """The [`RECORDED_OPTIONS`], by their names in [`state_dict`]."""
        return {name.removeprefix("fw_"): getattr(self.fw_args, name) for name in RECORDED_OPTIONS}

    def _apply_state(self, state: dict) -> None:
        """Restores a state [`check_resume`] read and checked against a model. A Trainer with `model_init` builds the
        model again in `train()`, after that check: its matrices must still be the ones the state lists."""
        if list(state["modules"]) != [matrix.name for matrix in self.matrices]:
            raise CheckpointError(
                "The model being trained is not the one the resume was checked against: its adapted matrices are not "
                f"the ones {IMPORTANCE_FILE} lists. Resume with the LoRA targets and rank the checkpoint was trained "
                "with."
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
            self._penalty, self._logged = None, False

    def format_table(self) -> str:
        """The importances as a text table, most important first."""
        return format_importance_table(self.state_dict())
