"""`FWLoraTrainerMixin`: the one place that holds FW-LoRA's hooks into a `transformers.Trainer` (or any subclass of it:
`Seq2SeqTrainer`, trl's `SFTTrainer`), so that LoRA, AdaLoRA and FW-LoRA run through one code path whatever the
Trainer."""

import logging
from collections import defaultdict
from contextlib import nullcontext
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import unwrap_peft_model

from .adalora_callback import AdaLoraAllocationCallback
from .arguments import FWLoraArguments
from .checkpoints import check_checkpoint, last_complete_checkpoint
from .compilation import compile_backend
from .errors import CheckpointError
from .extras import missing_modules
from .fisher_warmup import FisherWarmupCallback
from .identity import run_identity, write_run_identity
from .loss_normalization import loss_uses_num_items_in_batch
from .measurement import compile_stats
from .penalty import FisherWeightedPenalty
from .refusals import refuse_empty_training_data, refuse_untrainable_model
from .train_time import TrainTimeCallback


logger = logging.getLogger(__name__)


class FWLoraTrainerMixin:
    r"""
    Fisher-weighted LoRA for a [`~transformers.Trainer`] or any subclass of it: put it first among the bases,
    `class MyTrainer(FWLoraTrainerMixin, SFTTrainer)` ([`FWLoraTrainer`] is `(FWLoraTrainerMixin, Trainer)`, and
    [`fw_lora_trainer_class`] builds the class). Every override calls the Trainer's own method and adds to it; the
    only changes w.r.t. the Trainer it is mixed into are:

    - `__init__` refuses, before training, a model the method cannot train exactly: no LoRA adapter under a LoRA
      method, several active adapters, a LoRA variant FW-LoRA does not measure (DoRA, PiSSA, ..., see
      [`find_adapted_matrices`]), or an engine that owns the gradients (FSDP, DeepSpeed);

    - `compute_loss` is the Trainer's (with `num_items_in_batch`, so a causal LM's loss stays normalised over the label
      tokens of the whole accumulated batch); it routes the task loss through the Fisher estimator during the warm-up
      (so its hooks can undo the loss scaling) and records `task_loss`; for AdaLoRA the model's loss is the task loss
      alone, in training and evaluation, and peft's orthogonality regulariser is added to the training loss here and
      logged apart (`adalora_orth_penalty`);
    - `training_step`: once the importances are frozen (methods `fw_lora` and `iw_lora`), the last micro-batch of
      every optimizer step adds the gradient of `λ Σ_m (1 − I_m)^β ‖ΔW_m‖²` to the LoRA gradients, analytically, and
      the term to the reported loss; it records `fw_penalty` (`Σ (1 − I) ‖ΔW‖²`) and `fw_weighted_penalty` (`λ` times
      it). With `fw_warmup_mode="calibrate"` (IW-LoRA) the first one runs the calibration before it: K steps of
      forward/backward passes that update nothing, measured by the estimator, then the freeze;
    - `log` merges those averages (and AdaLoRA's rank budget) into every training report, and the frozen importances
      into a report of their own at the freeze, so they reach TensorBoard and every other integration; with
      `--torch_compile`, also what the compiler did so far (`compile/graphs`, `compile/graph_breaks`,
      `compile/recompiles`, see [`compile_stats`]);
    - `save_model` writes `fw_importance.json` into every checkpoint and `train(resume_from_checkpoint=...)` reads
      it back, so a resumed run continues the warm-up or keeps the frozen importances;
    - `save_model` also writes the run's identity (`fw_run_identity.json`: base model, data, method, adapter,
      optimisation, see [`run_identity`]), and `train` checks the checkpoint before resuming from it
      ([`check_resume`]): a checkpoint that is missing, incomplete, damaged or of another run is refused with a
      [`CheckpointError`] that says what to do;
    - where the loss is the model's own (the Trainer's `compute_loss`, no `compute_loss_func`) and the model ignores
      `num_items_in_batch` although its `forward` takes `**kwargs` (RoBERTa, BERT, every
      `...ForSequenceClassification`, see [`loss_uses_num_items_in_batch`]), `model_accepts_loss_kwargs = False`: the
      per-micro-batch mean loss is then divided by the gradient-accumulation steps, where transformers would skip that
      division and make the gradient GA times too large. Models whose loss uses `num_items_in_batch` (causal LMs) train
      exactly as under the Trainer.

    The warm-up, in both modes (its schedule, IW-LoRA's calibration, the freeze, `fw_importance.json`, the penalty of
    the frozen importances), is [`FisherWarmupCallback`]'s, the measurement its [`FisherEstimator`]'s: the trainer
    calls `loss_to_backpropagate`, `awaits_calibration`/`calibrate`, `penalty`, `importances_to_log` (when its
    `on_freeze` asks for a log), `check_resume`, `save` and `stop`, and nothing else of it. The same class runs `lora`
    (nothing added), `adalora` (with [`AdaLoraAllocationCallback`]) and `full`, so timings and results compare like
    for like.

    Its constructor takes the Trainer's arguments plus `fw_args` and `run_data` (see [`FWLoraTrainer`]).
    """

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        args: Optional[TrainingArguments] = None,
        *trainer_args,
        fw_args: Optional[FWLoraArguments] = None,
        run_data: Optional[dict[str, Any]] = None,
        **kwargs,
    ):
        fw_args = fw_args if fw_args is not None else FWLoraArguments()
        if args is not None and args.ddp_find_unused_parameters is None and fw_args.uses_lora:
            # Every adapter and head parameter takes part in every step: spare DDP its search of the graph.
            args.ddp_find_unused_parameters = False
        super().__init__(model, args, *trainer_args, **kwargs)
        self.fw_args = fw_args
        self.run_data = run_data
        if self.model_accepts_loss_kwargs and self._loss_is_the_models():
            # A model that takes `num_items_in_batch` but ignores it returns a per-micro-batch mean: have the Trainer
            # divide it by the accumulation steps (see the docstring).
            unwrapped = unwrap_peft_model(self.accelerator.unwrap_model(self.model))
            self.model_accepts_loss_kwargs = loss_uses_num_items_in_batch(unwrapped)
        self._fw_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._checked_checkpoint: Optional[str] = None  # the checkpoint `check_resume` accepted last
        self._compiled_penalty: Optional[tuple[FisherWeightedPenalty, Any]] = None  # under --torch_compile

        self.add_callback(TrainTimeCallback())
        self.fisher_callback: Optional[FisherWarmupCallback] = None
        self.adalora_callback: Optional[AdaLoraAllocationCallback] = None
        self._add_method_callbacks()
        if self.fisher_callback is not None and self.args.n_gpu > 1:
            raise ValueError(
                "FW-LoRA does not support `torch.nn.DataParallel` (several GPUs in one process): launch one process "
                "per GPU with `accelerate launch` or `torchrun` instead."
            )
        self._check_model(self.model)

    def call_model_init(self, trial=None):
        """`Trainer.call_model_init`, and the checks of [`_check_model`] on the model it builds (a hyper-parameter
        search builds every trial's model here, with that trial's method arguments)."""
        model = super().call_model_init(trial)
        if hasattr(self, "fw_args"):  # in `Trainer.__init__`, `__init__` checks the model once the method is known
            self._check_model(model)
        return model

    def _loss_is_the_models(self) -> bool:
        """Whether the training loss is the model's own output: the Trainer's `compute_loss` below this mixin (not a
        subclass's, such as `SFTTrainer`'s, which normalises by `num_items_in_batch` itself) and no
        `compute_loss_func`. A subclass above the mixin that computes a loss of its own, normalised over the
        accumulated batch, says so with the Trainer's `loss_is_scaled_for_ga = True`."""
        below = getattr(super().compute_loss, "__func__", None)
        return below is Trainer.compute_loss and self.compute_loss_func is None

    def _check_model(self, model: nn.Module) -> None:
        """Refuses, before anything trains, a model or engine on which the method would not be what it says
        ([`refuse_untrainable_model`])."""
        refuse_untrainable_model(model, self.fw_args, self.is_fsdp_enabled, self.is_deepspeed_enabled)

    def set_method_arguments(self, fw_args: FWLoraArguments) -> None:
        """
        Replaces the method's arguments and recreates its callback (the Fisher warm-up with the new K, λ, ... or
        AdaLoRA's allocation). A hyper-parameter search calls it from `model_init(trial)` with the trial's method
        arguments, before building the trial's model from them.
        """
        self.fw_args = fw_args
        self._add_method_callbacks()

    def _add_method_callbacks(self) -> None:
        """(Re)creates the method's callback from `self.fw_args`: the Fisher warm-up or AdaLoRA's rank allocation."""
        for callback in (self.fisher_callback, self.adalora_callback):
            if callback is not None:
                self.remove_callback(callback)
        self.fisher_callback = self.adalora_callback = None
        if self.fw_args.uses_fisher_weights:
            self.fisher_callback = FisherWarmupCallback(self.fw_args, on_freeze=self._log_frozen_importances)
            self.add_callback(self.fisher_callback)
        elif self.fw_args.method == "adalora":
            self.adalora_callback = AdaLoraAllocationCallback(self.fw_args.adalora_tinit, self.fw_args.adalora_tfinal)
            self.add_callback(self.adalora_callback)

    def train(self, resume_from_checkpoint: Optional[Union[str, bool]] = None, *args, **kwargs):
        """
        `Trainer.train`; a resume first checks the checkpoint ([`check_resume`], unless it was just called for that
        checkpoint), and the Fisher statistics saved in it are restored when training begins.
        `resume_from_checkpoint=True` takes the last complete checkpoint of the output directory: one whose save was
        interrupted is passed over.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise CheckpointError(f"There is no complete checkpoint to resume from in {self.args.output_dir}.")
        self.check_training_data()
        self._fw_metrics.clear()  # nothing of an attempt that died goes into the next one's logs
        if isinstance(resume_from_checkpoint, str):
            if resume_from_checkpoint != self._checked_checkpoint:
                self.check_resume(resume_from_checkpoint)
        elif self.fisher_callback is not None:
            # A new run: nothing an earlier `check_resume` read is restored.
            self.fisher_callback.discard_resume()
            self._checked_checkpoint = None
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        except BaseException:
            if self.fisher_callback is not None:
                self.fisher_callback.stop()
            raise
        self._checked_checkpoint = None  # checked for this `train()`; another resume is checked again
        # The run's training time over all its segments, beside the Trainer's `train_runtime` (this call's); the live
        # instance, which `--restore_callback_states_from_checkpoint` may have replaced.
        timer = next(cb for cb in self.callback_handler.callbacks if isinstance(cb, TrainTimeCallback))
        output.metrics.update(train_runtime_total=timer.seconds, train_segments=timer.segments)
        return output

    def check_training_data(self) -> None:
        """Refuses, before anything trains, training data that gives no batch ([`refuse_empty_training_data`])."""
        refuse_empty_training_data(
            self.train_dataset, self._train_batch_size, self.args.world_size, self.args.dataloader_drop_last
        )

    def check_resume(self, checkpoint_dir: str, weights_only: bool = False) -> None:
        """
        Checks that this run can resume from `checkpoint_dir`, before anything is loaded or written: a complete
        checkpoint of the same run ([`check_checkpoint`]: the identity, the weights, the training state unless
        `weights_only` accepts a `--save_only_model` one) and, for FW-LoRA and IW-LoRA, a consistent
        `fw_importance.json` (read here, applied when training begins). `train` calls it, unless a script called it
        first, before it wrote anything itself: each resume is checked once.

        Raises:
            `CheckpointError`: Saying what is wrong and what to do; a [`RunMismatchError`] for another run.
        """
        self._checked_checkpoint = None
        check_checkpoint(checkpoint_dir, self.model, self.identity(), weights_only)
        if self.fisher_callback is not None:
            self.fisher_callback.check_resume(checkpoint_dir, self.model)
        self._checked_checkpoint = checkpoint_dir

    def identity(self) -> dict[str, Any]:
        """What this run is: the [`run_identity`] of the model, the method, the training arguments and `run_data`."""
        return run_identity(self.model, self.fw_args, self.args, self.run_data)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Union[torch.Tensor, Any]],
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ) -> torch.Tensor:
        """
        `Trainer.training_step`; with IW-LoRA's calibration still to run, the warm-up runs it first, through
        [`_calibration_backward`]. Once the importances are frozen, the last micro-batch of each optimizer step adds
        the penalty's gradient (see [`_add_penalty_gradient`]) and the penalty to the loss it reports.
        """
        warmup = self.fisher_callback
        if warmup is not None and warmup.awaits_calibration:
            model.train()
            warmup.calibrate(
                lambda batch: self._calibration_backward(model, batch),
                self.callback_handler.train_dataloader,
                self.args,
                self.state,
            )
        loss = super().training_step(model, inputs, num_items_in_batch)
        penalty = warmup.penalty if warmup is not None else None
        if penalty is not None and penalty.fw_lambda > 0 and self.accelerator.sync_gradients:
            loss = loss + self._add_penalty_gradient(penalty).to(loss.dtype)
        return loss

    def _calibration_backward(self, model: nn.Module, batch: dict[str, Any]) -> None:
        """One micro-batch of IW-LoRA's calibration: forward, the task loss through the warm-up, backward, and the
        gradients dropped (nothing is updated)."""
        inputs = self._prepare_inputs(batch)
        # No all-reduce of gradients that nobody uses: each process measures its own micro-batches.
        with self.accelerator.no_sync(model):
            with self.compute_loss_context_manager():
                # The model's own loss, through `Trainer.compute_loss` itself: a subclass's (`SFTTrainer`'s) would
                # count these batches, which train nothing, in its token and accuracy metrics.
                loss = Trainer.compute_loss(self, model, inputs)
            self.accelerator.backward(self.fisher_callback.loss_to_backpropagate(loss))
        model.zero_grad(set_to_none=True)

    def _add_penalty_gradient(self, penalty: FisherWeightedPenalty) -> torch.Tensor:
        """
        Adds `λ ∇R` to the LoRA gradients and returns `λ R`. `R` does not depend on the data, so its gradient is added
        once per optimizer step, after the last micro-batch's backward pass, through
        [`FisherWeightedPenalty.backward`]: the analytic gradient, a dozen kernels per distinct shape instead of
        autograd's graph and one gradient accumulation per LoRA tensor (the step is bound by kernel launches on a GPU).
        This is the gradient that adding `λ R` to every micro-batch's loss would give: the gradient-accumulation
        division and the DDP mean of a term equal on every micro-batch and process leave it unchanged. Gradient
        clipping, which comes next, sees it.
        """
        scale = penalty.strength  # λ, a 0-dim tensor on the adapters' device
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # fp16: the task gradients carry the loss scale until the clipping unscales them; so must this one
            # (`GradScaler.scale` multiplies on the device: no host read).
            scale = scaler.scale(scale)
        value = self._penalty_backward(penalty)(scale)
        weighted = penalty.strength * value
        self._fw_metrics["fw_penalty"].append(value)
        self._fw_metrics["fw_weighted_penalty"].append(weighted)
        return weighted

    def _penalty_backward(self, penalty: FisherWeightedPenalty):
        """`penalty.backward`, compiled (once per penalty: [`FisherWeightedPenalty.compiled_backward`]) with the
        model's backend and mode under `--torch_compile`: a fixed small function whose eager form launches about
        fifteen kernels per distinct shape, beside a compiled step that launches few."""
        backend = compile_backend(self.args)
        if backend is None:
            return penalty.backward
        if self._compiled_penalty is None or self._compiled_penalty[0] is not penalty:
            self._compiled_penalty = (penalty, penalty.compiled_backward(backend, self.args.torch_compile_mode))
        return self._compiled_penalty[1]

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Union[torch.Tensor, Any]],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ):
        adalora = self.adalora_callback
        with adalora.task_loss_only(self.model) if adalora is not None else nullcontext():
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = result if return_outputs else (result, None)
        if not model.training:
            return result

        # A loss normalised over the whole accumulated step is the micro-batch's share of it: reported (and measured
        # by the warm-up) on the scale of the micro-batch's own mean, as a per-micro-batch loss is.
        micro_batches = (
            self.current_gradient_accumulation_steps if self._loss_is_scaled_for_ga(num_items_in_batch) else 1
        )
        self._fw_metrics["task_loss"].append(loss.detach() * micro_batches if micro_batches != 1 else loss.detach())
        if adalora is not None and self.fw_args.adalora_orth_reg_weight > 0:
            # What peft's forward adds, outside `task_loss`: it still trains the model as peft intends.
            orthogonality = adalora.orthogonality_penalty(self.model)
            self._fw_metrics["adalora_orth_penalty"].append(orthogonality.detach())
            # Once per step, as peft adds it: a loss normalised over the step's tokens is not divided by the
            # accumulation steps afterwards, so its share of the step is added to each micro-batch.
            loss = loss + orthogonality * (self.fw_args.adalora_orth_reg_weight / micro_batches)
        if self.fisher_callback is not None:
            # Lets the warm-up's hooks undo what scales the loss from here on (1 / GA, an fp16 loss scale).
            loss = self.fisher_callback.loss_to_backpropagate(loss, micro_batches)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Optional[Union[torch.Tensor, int]]) -> bool:
        """Whether the Trainer's `training_step` takes the loss as already scaled for gradient accumulation (it then
        skips its division by the accumulation steps): the Trainer's own rule."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return self.loss_is_scaled_for_ga
        return (
            self.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or self.compute_loss_func is not None

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        # Training logs carry "loss"; evaluation logs do not and get no training averages.
        if "loss" in logs:
            if self._fw_metrics:
                # Every rank logs together (the Trainer gathers "loss" the same way): average over ranks too.
                names = sorted(self._fw_metrics)
                means = torch.stack([torch.stack(self._fw_metrics[name]).float().mean() for name in names])
                means = self.accelerator.reduce(means, reduction="mean")
                logs.update(zip(names, means.tolist()))
                self._fw_metrics.clear()
            if self.args.torch_compile:
                logs.update({f"compile/{name}": value for name, value in compile_stats().items()})
            if self.adalora_callback is not None and self.adalora_callback.budget is not None:
                logs["adalora_total_rank"] = float(self.adalora_callback.budget)
                logs["adalora_mean_rank"] = self.adalora_callback.budget / self.adalora_callback.num_matrices
        super().log(logs, start_time)

    def _log_frozen_importances(self) -> None:
        """At the freeze, whichever step it is: the importances in a report of their own. Not through the Trainer's
        control flags: `control.should_log` at the freeze would add a training log at step K (and restart the loss
        average there), and the next training log would report them away from the freeze; either changes the log
        history of every run. So the freeze calls this (`on_freeze`), and the one flag a log clears is put back."""
        importances = self.fisher_callback.importances_to_log()
        if importances is None:
            return
        # A log clears the Trainer's `should_log`: a training log due at this step must still happen.
        due = self.control.should_log
        # `Trainer.log` itself, not a subclass's: `SFTTrainer.log` would merge the step's own metrics into this report
        # and clear them before the step's training log.
        Trainer.log(self, {f"fw_importance/{name}": value for name, value in importances.items()})
        self.control.should_log = due
        # After the scalars: TensorBoard's writer, closed when training ends, is open again once they are logged.
        self._log_importance_heatmap(importances)

    def _log_importance_heatmap(self, importances: dict[str, float]) -> None:
        """The frozen importances as a layer × module-role heatmap image in TensorBoard (`fw_importance/heatmap`)."""
        writers = [
            cb.tb_writer
            for cb in self.callback_handler.callbacks
            if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None
        ]
        if not writers:
            return
        if missing_modules(["matplotlib"]):
            logger.warning(
                "The importances are logged to TensorBoard as scalars, without their heatmap image: drawing it needs "
                "matplotlib, which is not installed (`pip install matplotlib`)."
            )
            return
        from .heatmap import add_importance_heatmap  # matplotlib is imported when a figure is drawn

        add_importance_heatmap(writers, importances, self.fisher_callback.frozen_at_step, self.state.global_step)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, plus `fw_run_identity.json` and `fw_importance.json`, each written atomically (also
        in every checkpoint)."""
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            write_run_identity(output_dir, self.identity())
            if self.fisher_callback is not None:
                self.fisher_callback.save(output_dir)
