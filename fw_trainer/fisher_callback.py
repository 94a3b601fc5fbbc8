"""The FW-LoRA warm-up schedule in a `Trainer`: measure `F_m` for K steps, then freeze the importances `I_m`."""

import json
import logging
import os
import warnings
from typing import Optional

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .adapted_matrices import AdaptedMatrix
from .fisher_estimator import FisherEstimator
from .importance import normalize_importances
from .run_artifacts import IMPORTANCE_FILE, write_json_atomic


logger = logging.getLogger(__name__)


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
        estimator (`str`, *optional*, defaults to `"exact"`):
            `"exact"` or `"sketch"`; the sketch's probes come from a generator of its own seeded with `args.seed`.
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
        estimator: str = "exact",
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
        """Ends the warm-up: removes the hooks, reads `F` and normalises it into `I`; on the main process, logs the
        table and writes `fw_importance.json` into `args.output_dir`."""
        self.estimator.stop()
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

    def load(self, checkpoint_dir: str) -> bool:
        """Reads the state saved in a checkpoint, applied when training begins. Returns whether a file was found."""
        path = os.path.join(checkpoint_dir, IMPORTANCE_FILE)
        if not os.path.isfile(path):
            return False
        with open(path) as f:
            self._state_to_restore = json.load(f)
        return True

    def _apply_state(self, state: dict) -> None:
        names = [matrix.name for matrix in self.matrices]
        if list(state["modules"]) != names:
            raise ValueError(
                "The checkpoint's fw_importance.json lists other adapted modules than the model being trained: "
                f"saved {list(state['modules'])[:3]}..., model {names[:3]}.... Resume with the same LoRA targets."
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
