"""Warm-up estimation of the per-matrix Fisher proxy `F_m` and its freezing into importances `I_m`."""

import json
import logging
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .adapted_matrices import AdaptedMatrix, find_adapted_matrices
from .autocast import autocast_disabled
from .importance import bias_corrected, ema_update, normalize_importances, running_mean_update
from .run_artifacts import IMPORTANCE_FILE


logger = logging.getLogger(__name__)


def _cycle(dataloader: Iterable) -> Iterator:
    while True:
        yield from dataloader


class _LossGradientProbe(torch.autograd.Function):
    """
    Identity on the loss whose backward records `∂(backpropagated objective)/∂loss`: the product of every factor
    applied to the loss after `compute_loss` (1 / gradient-accumulation steps, the fp16 loss scale, ...). It runs
    before the backward of any layer, so the layer hooks can divide it out and see the micro-batch's own loss.
    """

    @staticmethod
    def forward(ctx, loss: torch.Tensor, callback: "FisherWarmupCallback") -> torch.Tensor:
        ctx.callback = callback
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        ctx.callback._loss_grad = grad_output.detach().float()
        return grad_output, None


class FisherWarmupCallback(TrainerCallback):
    r"""
    Accumulates, for the first `warmup_steps` optimizer steps, an exponential moving average of
    `‖∇_{W_m} L‖_F²` for every frozen weight `W_m` that carries a LoRA adapter, then freezes the normalised
    importances `I_m` and removes its hooks (no cost afterwards).

    Per optimizer step `t`, `g_{m,t}` is the mean over the step's micro-batches, on every rank, of the squared
    gradient norm of that micro-batch's own mean task loss (gradient-accumulation division and fp16 loss scale
    undone, non-finite micro-batches skipped). Then `F_m ← α F_m + (1 − α) g_{m,t}` from `F_m = 0`, read back with
    Adam's bias correction `F_m / (1 − α^t)`, so the first step is not over-weighted. All ranks all-reduce one vector of
    `M + 1` floats per step and end with identical `F`.

    The gradient is never stored: a forward hook keeps the layer input `X` (autograd keeps it for `lora_A` anyway)
    and a tensor hook on the layer output receives `G = ∂L/∂y`; then `‖∇W‖² = ‖Gᵀ X‖²`. Frozen weights stay frozen,
    out of the optimizer and out of DDP's buckets.

    The IW-LoRA variant changes three things, each an option: the statistic `‖∇W_m‖_F` instead of its square
    (`statistic="norm"`), a plain running mean instead of the moving average (`average="mean"`), and the penalty
    weights `(1 − I_m)^β` (`power=β`). Its calibration mode (K steps that update nothing, before training) is run by
    [`FWLoraTrainer`] through [`calibrate`].

    This callback is driven by [`FWLoraTrainer`], which routes its training loss through [`scale_probe`].

    Args:
        warmup_steps (`int`): Number K of optimizer steps of accumulation.
        ema_decay (`float`, *optional*, defaults to `0.98`): Decay α of the moving average.
        normalization (`str`, *optional*, defaults to `"sum"`): `"sum"` (`I = F / ΣF`) or `"max"` (`I = F / max F`).
        statistic (`str`, *optional*, defaults to `"sq_norm"`): `"sq_norm"` (`‖∇W‖²`) or `"norm"` (`‖∇W‖`).
        average (`str`, *optional*, defaults to `"ema"`): `"ema"` or `"mean"`.
        power (`float`, *optional*, defaults to `1.0`): Exponent β of the penalty weights `(1 − I)^β`.
        estimator (`str`, *optional*, defaults to `"exact"`):
            `"exact"` (`‖Gᵀ X‖²`, one GEMM) or `"sketch"` (`‖(X Z)ᵀ G‖² / k`, `k` Gaussian probes drawn from a
            generator of its own seeded with `args.seed`, so the training's random stream is untouched).
        sketch_probes (`int`, *optional*, defaults to `8`): Number `k` of probes of the sketch.
        calibration_backward (`Callable[[dict], None]`, *optional*):
            Given, the statistic is measured in a calibration before training (see [`calibrate`]) by calling it on
            each micro-batch: it must run forward and backward with the loss routed through [`scale_probe`] and leave
            no gradient behind. Not given, it is measured during the first `warmup_steps` training steps.
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
        calibration_backward: Optional[Callable[[dict], None]] = None,
        adapter_name: str = "default",
    ):
        self.warmup_steps = warmup_steps
        self.ema_decay = ema_decay
        self.normalization = normalization
        self.statistic = statistic
        self.average = average
        self.power = power
        self.estimator = estimator
        self.sketch_probes = sketch_probes
        self._probe_seed = 0
        self._generator: Optional[torch.Generator] = None
        # Sketch: this micro-batch's probes per input width, and the last input sketched (query, key and value read
        # the same tensor: it is sketched once).
        self._probes: dict[int, torch.Tensor] = {}
        self._last_sketch: Optional[tuple[weakref.ref, torch.Tensor]] = None
        self.calibration_backward = calibration_backward
        self.adapter_name = adapter_name

        self.matrices: Optional[list[AdaptedMatrix]] = None
        self.fisher: Optional[torch.Tensor] = None  # bias-corrected F, set when frozen
        self.importances: Optional[torch.Tensor] = None  # I, set when frozen
        self.frozen_at_step: Optional[int] = None
        self._running: Optional[torch.Tensor] = None  # raw moving average, or the running mean
        self._num_updates: Optional[torch.Tensor] = None
        self._step_sum: Optional[torch.Tensor] = None
        self._step_count: Optional[torch.Tensor] = None
        self._pending: list[Optional[torch.Tensor]] = []
        self._loss_grad: Optional[torch.Tensor] = None
        self._handles: list[Any] = []
        self._state_to_restore: Optional[dict] = None

    # ----- state ------------------------------------------------------------------------------------------------

    @property
    def frozen(self) -> bool:
        """Whether the importances are frozen (the warm-up is over)."""
        return self.importances is not None

    @property
    def is_measuring(self) -> bool:
        """Whether the hooks are installed (during the warm-up only)."""
        return bool(self._handles)

    @property
    def penalty_weights(self) -> torch.Tensor:
        """`(1 − I_m)^β` for every adapted matrix, once frozen."""
        if not self.frozen:
            raise RuntimeError("The importances are not frozen yet: the Fisher warm-up is still running.")
        return (1.0 - self.importances).pow(self.power)

    def _setup(self, model: nn.Module) -> None:
        """Finds the adapted matrices of `model` and starts from an empty estimate (a new model is a new run)."""
        if self.matrices is not None:
            self._remove_hooks()
        self.fisher = self.importances = self.frozen_at_step = None
        self.matrices = find_adapted_matrices(model, self.adapter_name)
        if not self.matrices:
            raise ValueError(
                "FW-LoRA found no weight matrix carrying a LoRA adapter in the model. Wrap the model with "
                "`peft.get_peft_model(model, LoraConfig(...))` (or `fw_trainer.build_peft_model`) before training."
            )
        # The statistics live in fp32 on the adapters' device, whatever the default dtype or device.
        like = {"device": self.matrices[0].lora_A.device, "dtype": torch.float32}
        num_matrices = len(self.matrices)
        self._running = torch.zeros(num_matrices, **like)
        self._num_updates = torch.zeros((), **like)
        self._step_sum = torch.zeros(num_matrices, **like)
        self._step_count = torch.zeros((), **like)
        self._pending = [None] * num_matrices

    # ----- hooks ------------------------------------------------------------------------------------------------

    def _install_hooks(self) -> None:
        for index, matrix in enumerate(self.matrices):
            self._handles.append(matrix.layer.register_forward_hook(partial(self._forward_hook, index)))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = [None] * len(self.matrices)
        self._loss_grad = None
        self._probes, self._last_sketch = {}, None

    def _forward_hook(self, index: int, module: nn.Module, args: tuple, output: Any) -> None:
        # Under `no_grad` (evaluation, the first pass of reentrant gradient checkpointing) there is nothing to measure.
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        if self.estimator == "sketch":
            # Only X Z (N × k) waits for the backward pass, not X.
            inputs = self._sketch(args[0])
        else:
            inputs = args[0].detach().reshape(-1, args[0].shape[-1])
        output.register_hook(partial(self._output_grad_hook, index, inputs))

    @torch.no_grad()
    def _sketch(self, x: torch.Tensor) -> torch.Tensor:
        """
        `X Z` in fp32 for an adapted layer's input `X`. The probes `Z` are drawn once per micro-batch and input width,
        and a tensor fed to several layers in a row (query, key, value) is sketched once: fewer kernels, and common
        random numbers across matrices. Each matrix's estimate is still unbiased, with the same variance as with probes
        of its own.

        This runs in the forward hook, i.e. inside the model's autocast context, which would turn the product into
        bf16/fp16 and later meet the fp32 output gradient: autocast is switched off here.
        """
        if self._last_sketch is not None and self._last_sketch[0]() is x:
            return self._last_sketch[1]
        width = x.shape[-1]
        probes = self._probes.get(width)
        if probes is None:
            generator = self._probe_generator(x)
            probes = torch.randn(width, self.sketch_probes, device=x.device, dtype=torch.float32, generator=generator)
            self._probes[width] = probes
        with autocast_disabled(x.device):
            sketch = torch.mm(x.detach().reshape(-1, width).float(), probes)
        self._last_sketch = (weakref.ref(x), sketch)
        return sketch

    def _probe_generator(self, like: torch.Tensor) -> torch.Generator:
        if self._generator is None or self._generator.device != like.device:
            self._generator = torch.Generator(device=like.device).manual_seed(self._probe_seed)
        return self._generator

    @torch.no_grad()
    def _output_grad_hook(self, index: int, inputs: torch.Tensor, output_grad: torch.Tensor) -> None:
        if self._loss_grad is None:
            raise RuntimeError(
                "FisherWarmupCallback saw a backward pass that did not start from `FWLoraTrainer.compute_loss`. "
                "Train with `fw_trainer.FWLoraTrainer` (it routes the loss through `scale_probe`)."
            )
        # fp32 whatever the activations' dtype, and whether or not `backward()` was called under autocast.
        grad = output_grad.reshape(-1, output_grad.shape[-1]).float()
        with autocast_disabled(grad.device):
            if self.estimator == "sketch":
                # E‖Gᵀ X z‖² = ‖Gᵀ X‖_F² for z ~ N(0, I); (X Z)ᵀ G (k × d_out) avoids transposing the large G.
                value = torch.mm(inputs.t(), grad).square().sum() / self.sketch_probes
            else:
                # ∇W = Gᵀ X for y = X Wᵀ: one GEMM, the (d_out × d_in) result is dropped at once.
                value = torch.mm(grad.t(), inputs.float()).square().sum()
        value = value / self._loss_grad.square()
        if self.statistic == "norm":
            value = value.sqrt()
        previous = self._pending[index]
        self._pending[index] = value if previous is None else previous + value

    def scale_probe(self, loss: torch.Tensor) -> torch.Tensor:
        """Routes the training loss through the probe that lets the hooks undo loss scaling (warm-up only)."""
        if not self.is_measuring:
            return loss
        return _LossGradientProbe.apply(loss, self)

    # ----- accumulation -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _fold_micro_batch(self) -> None:
        """Adds the finished micro-batch's statistic to the step's sum, unless it is not finite."""
        self._probes, self._last_sketch = {}, None  # the next micro-batch draws new probes
        if self._loss_grad is None:  # no backward ran since the last fold
            return
        zero = self._step_sum.new_zeros(())
        micro = torch.stack([zero if value is None else value for value in self._pending])
        finite = torch.isfinite(micro).all()
        self._step_sum += torch.where(finite, micro, zero)
        self._step_count += finite
        self._pending = [None] * len(self.matrices)
        self._loss_grad = None

    @torch.no_grad()
    def _end_optimizer_step(self) -> None:
        totals = torch.cat([self._step_sum, self._step_count.reshape(1)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        step_sum, step_count = totals[:-1], totals[-1]
        step_mean = step_sum / step_count.clamp_min(1.0)
        if self.average == "ema":
            self._running, self._num_updates = ema_update(
                self._running, self._num_updates, step_mean, step_count > 0, self.ema_decay
            )
        else:
            self._running, self._num_updates = running_mean_update(
                self._running, self._num_updates, step_mean, step_count > 0
            )
        self._step_sum.zero_()
        self._step_count.zero_()

    def _current_estimate(self) -> torch.Tensor:
        """F from the running state: the bias-corrected moving average, or the running mean itself."""
        if self.average == "ema":
            return bias_corrected(self._running, self._num_updates, self.ema_decay)
        return self._running.clone()

    @torch.no_grad()
    def _freeze(self, args: TrainingArguments, state: TrainerState) -> None:
        self._remove_hooks()
        self.fisher = self._current_estimate()
        self.importances = normalize_importances(self.fisher, self.normalization).to(self.fisher.device)
        self.frozen_at_step = state.global_step
        if state.is_world_process_zero:
            logger.info("FW-LoRA importances frozen at step %d:\n%s", state.global_step, self.format_table())
            self.save(args.output_dir)

    # ----- Trainer events ---------------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._probe_seed, self._generator = args.seed, None
        model = kwargs["model"]
        # A Trainer with `model_init` (hyper-parameter search) brings a new model to every `train()` call.
        if self.matrices is None or not any(module is self.matrices[0].layer for module in model.modules()):
            self._setup(model)
        if self._state_to_restore is not None:
            self._apply_state(self._state_to_restore)
            self._state_to_restore = None
        if self.frozen:
            return
        if self.calibration_backward is not None:
            self.calibrate(args, state, kwargs["train_dataloader"])
        elif state.global_step >= self.warmup_steps:
            self._freeze(args, state)
        elif not self.is_measuring:
            self._install_hooks()

    def calibrate(self, args: TrainingArguments, state: TrainerState, dataloader: Iterable) -> None:
        """
        IW-LoRA's calibration: `warmup_steps` steps of `gradient_accumulation_steps` forward/backward passes each
        (through `calibration_backward`), updating nothing and not counted as training steps, then the freeze.
        """
        batches = _cycle(dataloader)
        self._install_hooks()
        for _ in range(self.warmup_steps):
            for _ in range(args.gradient_accumulation_steps):
                self.calibration_backward(next(batches))
                self._fold_micro_batch()
            self._end_optimizer_step()
        logger.info("IW-LoRA calibration: %d steps measured, nothing updated.", self.warmup_steps)
        self._freeze(args, state)

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.is_measuring:
            self._fold_micro_batch()

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.is_measuring:
            self._fold_micro_batch()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not self.is_measuring:
            return
        self._end_optimizer_step()
        if state.global_step >= self.warmup_steps:
            self._freeze(args, state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.matrices is not None and not self.frozen:
            warnings.warn(
                f"Training ended after {state.global_step} optimizer steps, before the FW-LoRA warm-up of "
                f"{self.warmup_steps} steps finished: the importances are frozen now from the steps seen, and the "
                "penalty was never applied. Lower `fw_warmup_steps` or train longer.",
                stacklevel=2,
            )
            self._freeze(args, state)

    # ----- persistence ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """A JSON-serialisable description of the estimate: module name → F, I, 1 − I, d_out, d_in, r, and the
        running state needed to resume mid-warm-up."""
        if self.matrices is None:
            raise RuntimeError("FisherWarmupCallback has no statistics yet: it is set up when training begins.")
        # One device-to-host copy per vector (not one per matrix): this runs at the freeze and at checkpoints only.
        num_matrices = len(self.matrices)
        fisher = (self.fisher if self.frozen else self._current_estimate()).tolist()
        importances = self.importances.tolist() if self.frozen else [None] * num_matrices
        penalty_weights = self.penalty_weights.tolist() if self.frozen else [None] * num_matrices
        running = self._running.tolist()
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
            "ema_decay": self.ema_decay,
            "normalization": self.normalization,
            "statistic": self.statistic,
            "average": self.average,
            "power": self.power,
            "estimator": self.estimator,
            "num_updates": int(self._num_updates.item()),
            "modules": modules,
        }

    def save(self, output_dir: str) -> None:
        """Writes [`state_dict`] to `output_dir/fw_importance.json`."""
        if self.matrices is None:
            return
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, IMPORTANCE_FILE), "w") as f:
            json.dump(self.state_dict(), f, indent=2)

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
        like = {"device": self._running.device, "dtype": torch.float32}
        rows = list(state["modules"].values())
        self._running = torch.tensor([row["running_state"] for row in rows], **like)
        self._num_updates = torch.tensor(float(state["num_updates"]), **like)
        if state["frozen"]:
            self._remove_hooks()
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
