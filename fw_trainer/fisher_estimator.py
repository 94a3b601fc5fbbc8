"""`FisherEstimator`: the per-matrix Fisher proxy `F_m` of the LoRA-adapted weights, measured by hooks in any training
loop (`FWLoraTrainer`, plain PyTorch, `accelerate`)."""

from collections.abc import Sequence
from functools import partial
from typing import Any, Optional, Union

import torch
from torch import nn

from .adapted_matrices import AdaptedMatrix, find_adapted_matrices
from .arguments import FWLoraArguments, check_option, default_of
from .autocast import autocast_disabled
from .importance import bias_corrected, ema_update, running_mean_update


class _LossGradientProbe(torch.autograd.Function):
    """
    Identity on the loss whose backward records `∂(backpropagated objective)/∂loss` in the estimator: the product of
    every factor applied to the loss after it left the model (1 / gradient-accumulation steps, the fp16 loss scale,
    ...), divided by `micro_batches`. It runs before the backward of any layer, so the layer hooks can divide it out
    and see `micro_batches × loss`.
    """

    @staticmethod
    def forward(ctx, loss: torch.Tensor, estimator: "FisherEstimator", micro_batches: int) -> torch.Tensor:
        ctx.estimator = estimator
        ctx.micro_batches = micro_batches
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        loss_grad = grad_output.detach().float()
        ctx.estimator._loss_grad = loss_grad / ctx.micro_batches if ctx.micro_batches != 1 else loss_grad
        return grad_output, None, None


class _FisherTap(torch.autograd.Function):
    """
    Identity on an adapted layer's output `y`, put there while the estimator measures. Its backward returns, as the
    gradient of the matrix's zero `probe`, `‖∇W‖_F` of the backpropagated objective: `‖Gᵀ X‖_F` (exact) or
    `‖(X Z)ᵀ G‖_F` (sketch: `inputs` is `X Z`), computed in fp32 outside autocast from `G = ∂/∂y`. No side effect:
    Dynamo traces it into the compiled model's graph, and autograd hands the value to the probe's `.grad`.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, inputs: torch.Tensor, probe: torch.Tensor, sketched: bool) -> torch.Tensor:
        ctx.sketched = sketched
        ctx.save_for_backward(inputs)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (inputs,) = ctx.saved_tensors
        # fp32 whatever the activations' dtype, and whether or not `backward()` was called under autocast.
        grad = grad_output.reshape(-1, grad_output.shape[-1]).float()
        with autocast_disabled(grad.device):
            if ctx.sketched:
                # E‖Gᵀ X z‖² = ‖Gᵀ X‖_F² for z ~ N(0, I); (X Z)ᵀ G (k × d_out) avoids transposing the large G.
                product = torch.mm(inputs.t(), grad)
            else:
                # ∇W = Gᵀ X for y = X Wᵀ: one GEMM, the (d_out × d_in) result is dropped at once.
                product = torch.mm(grad.t(), inputs.float())
            norm = torch.linalg.vector_norm(product)
        return grad_output, None, norm, None


def resolve_estimator(estimator: str, device: torch.device) -> str:
    """
    The estimator `"auto"` stands for on `device`: the sketch on an accelerator, where a training step is bound by
    kernel launches and memory and the exact estimator costs both (one more GEMM per matrix from inputs it keeps alive
    until the backward pass: +11 % peak memory on roberta-base), the exact value on the CPU (and the `meta` device).
    Other values are returned as they are.
    """
    if estimator != "auto":
        return estimator
    return "exact" if device.type in ("cpu", "meta") else "sketch"


class FisherEstimator:
    r"""
    Measures, for every frozen weight `W_m` that carries a LoRA adapter, the average over optimizer steps of
    `‖∇_{W_m} L‖_F²` (or of `‖∇_{W_m} L‖_F`), without ever storing the gradient: while measuring, a forward hook puts
    an identity autograd function on the layer output ([`_FisherTap`]) that keeps the layer input `X` (autograd keeps
    it for `lora_A` anyway) and, in the backward pass, turns `G = ∂L/∂y` into `‖Gᵀ X‖_F`, the gradient of a zero probe
    of the matrix. Frozen weights stay frozen, out of the optimizer and out of DDP's buckets.

    The measurement has no side effect, so `torch.compile` traces it into the model's graph: a compiled model compiles
    with the tap from its first step, and once more, without it, when [`stop`] is called (the hooks read a flag that
    Dynamo guards). Nothing of it is left in the graph after the warm-up.

    Per optimizer step `t`, `g_{m,t}` is the mean over the step's micro-batches, on every process, of the statistic of
    that micro-batch's own loss (gradient-accumulation division and fp16 loss scale undone, non-finite micro-batches
    skipped). Then `F_m ← α F_m + (1 − α) g_{m,t}` from `F_m = 0`, read back with Adam's bias correction
    `F_m / (1 − α^t)` so the first step is not over-weighted (or, with `average="mean"`, the plain running mean).
    Processes all-reduce one vector of `M + 1` floats per step and end with identical `F`. Everything stays on the
    adapters' device in fp32: nothing is read back to the host.

    A training loop drives it like this (one micro-batch per step here):

    ```python
    estimator = FisherEstimator(model)
    estimator.start()
    for batch in warmup_batches:
        loss = model(**batch).loss
        accelerator.backward(estimator.loss_to_backpropagate(loss))
        estimator.fold_micro_batch()
        optimizer.step()
        optimizer.zero_grad()
        estimator.end_step()
    estimator.stop()
    fisher = estimator.fisher
    ```

    Args:
        model_or_matrices (`nn.Module` or `Sequence[AdaptedMatrix]`):
            A peft LoRA model (possibly wrapped by DDP or `accelerate`), whose adapted matrices are found with
            [`find_adapted_matrices`], or the matrices themselves.
        statistic (`str`, *optional*, defaults to `"sq_norm"`): `"sq_norm"` (`‖∇W‖²`) or `"norm"` (`‖∇W‖`, IW-LoRA).
        average (`str`, *optional*, defaults to `"ema"`): `"ema"` (bias-corrected) or `"mean"` (IW-LoRA).
        ema_decay (`float`, *optional*, defaults to `0.98`): Decay α of the moving average.
        estimator (`str`, *optional*, defaults to `"auto"`):
            `"exact"` (`‖Gᵀ X‖²`, one GEMM), `"sketch"` (`‖(X Z)ᵀ G‖² / k` with `k` Gaussian probes `Z`, drawn afresh
            for every micro-batch) or `"auto"`: the sketch when the adapters live on an accelerator, the exact value on
            the CPU (see [`resolve_estimator`]). The attribute `kind` holds the one in use (`"exact"` or `"sketch"`).
        sketch_probes (`int`, *optional*, defaults to `8`): Number `k` of probes of the sketch.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sketch's own random generator (restarted by [`start`]), so that the training's random stream is
            untouched.
        adapter_name (`str`, *optional*): The LoRA adapter whose matrices are measured; defaults to the active one.
        compile_backend (`str`, *optional*):
            With a `torch.compile` backend, the arithmetic that folds each micro-batch and each step into the average
            is compiled too (a compiled training step, where every kernel launch counts); eager by default.
    """

    def __init__(
        self,
        model_or_matrices: Union[nn.Module, Sequence[AdaptedMatrix]],
        statistic: str = default_of("fw_statistic"),
        average: str = default_of("fw_average"),
        ema_decay: float = default_of("fw_ema_decay"),
        estimator: str = default_of("fw_estimator"),
        sketch_probes: int = default_of("fw_sketch_probes"),
        seed: int = 0,
        adapter_name: Optional[str] = None,
        compile_backend: Optional[str] = None,
    ):
        # The options of `FWLoraArguments` without their `fw_` prefix: checked where they are defined.
        statistic, average, ema_decay, estimator, sketch_probes = (
            check_option(f"fw_{name}", value, argument=name)
            for name, value in (
                ("statistic", statistic),
                ("average", average),
                ("ema_decay", ema_decay),
                ("estimator", estimator),
                ("sketch_probes", sketch_probes),
            )
        )
        self.statistic = statistic
        self.average = average
        self.ema_decay = ema_decay
        self.sketch_probes = sketch_probes
        self.seed = seed
        if isinstance(model_or_matrices, nn.Module):
            model_or_matrices = find_adapted_matrices(model_or_matrices, adapter_name)
        self.matrices: list[AdaptedMatrix] = list(model_or_matrices)
        if not self.matrices:
            raise ValueError(
                "FW-LoRA found no weight matrix carrying a LoRA adapter in the model. Wrap the model with "
                "`peft.get_peft_model(model, LoraConfig(...))` (or `fw_trainer.build_peft_model`) before training."
            )
        self.kind = resolve_estimator(estimator, self.matrices[0].lora_A.device)

        # The statistics live in fp32 on the adapters' device, whatever the default dtype or device.
        like = {"device": self.matrices[0].lora_A.device, "dtype": torch.float32}
        num_matrices = len(self.matrices)
        self._running = torch.zeros(num_matrices, **like)  # raw moving average, or the running mean
        self._num_updates = torch.zeros((), **like)
        self._step_sum = torch.zeros(num_matrices, **like)
        self._step_count = torch.zeros((), **like)
        # One zero probe per matrix, whose `.grad` receives this micro-batch's `‖∇W_m‖_F` of the backpropagated
        # (scaled) objective from the tap's backward: one GEMM and one norm per matrix, nothing else.
        self._taps = [torch.zeros((), **like, requires_grad=True) for _ in range(num_matrices)]
        self._zero = torch.zeros((), **like)
        self._loss_grad: Optional[torch.Tensor] = None  # set by `_LossGradientProbe` in the backward pass
        self._handles: list[Any] = []
        self._measuring = False  # read by the hooks, so that a compiled model recompiles without them at `stop`
        # Sketch: this micro-batch's probes `Z` per input width, drawn between micro-batches (outside any compiled
        # graph) from a generator of the estimator's own, in the order the matrices first use each width.
        self._generator: Optional[torch.Generator] = None
        # The per-micro-batch and per-step arithmetic, about ten small operators each: compiled into one or two
        # kernels beside a compiled model (`compile_backend`), eager otherwise.
        self._fold, self._average = self._fold_norms, self._average_step
        if compile_backend is not None:
            self._fold = torch.compile(self._fold_norms, backend=compile_backend)
            self._average = torch.compile(self._average_step, backend=compile_backend)
        # One buffer for all widths, so that a draw is one kernel; each width's probes are a view of it.
        widths = list(dict.fromkeys(matrix.d_in for matrix in self.matrices))
        self._sketch_buffer = torch.empty(sum(widths) * sketch_probes, **like)
        views = self._sketch_buffer.split([width * sketch_probes for width in widths])
        self._sketch_probes = {width: view.view(width, sketch_probes) for width, view in zip(widths, views)}

    @classmethod
    def from_args(
        cls,
        model_or_matrices: Union[nn.Module, Sequence[AdaptedMatrix]],
        fw_args: FWLoraArguments,
        seed: int = 0,
        adapter_name: Optional[str] = None,
        compile_backend: Optional[str] = None,
    ) -> "FisherEstimator":
        """The estimator that [`FWLoraArguments`] describe (`fw_statistic`, `fw_average`, `fw_ema_decay`,
        `fw_estimator`, `fw_sketch_probes`)."""
        return cls(
            model_or_matrices,
            statistic=fw_args.fw_statistic,
            average=fw_args.fw_average,
            ema_decay=fw_args.fw_ema_decay,
            estimator=fw_args.fw_estimator,
            sketch_probes=fw_args.fw_sketch_probes,
            seed=seed,
            adapter_name=adapter_name,
            compile_backend=compile_backend,
        )

    # ----- public API -------------------------------------------------------------------------------------------

    @property
    def is_measuring(self) -> bool:
        """Whether the hooks are installed (between [`start`] and [`stop`])."""
        return self._measuring

    def start(self) -> None:
        """Installs the hooks: from now on every backward pass through the adapted layers is measured, compiled or
        not."""
        if self.is_measuring:
            return
        if self.kind == "sketch":
            device = self.matrices[0].lora_A.device
            self._generator = torch.Generator(device=device).manual_seed(self.seed)  # the probes restart from `seed`
            self._draw_sketch_probes()
        self._measuring = True
        for index, matrix in enumerate(self.matrices):
            self._handles.append(matrix.layer.register_forward_hook(partial(self._forward_hook, index)))

    def stop(self) -> None:
        """Removes the hooks (no cost afterwards: a compiled model recompiles once, without them) and drops any
        micro-batch not folded in yet."""
        self._measuring = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for tap in self._taps:
            tap.grad = None
        self._loss_grad = None

    def loss_to_backpropagate(self, loss: torch.Tensor, micro_batches: int = 1) -> torch.Tensor:
        """
        The loss to call `backward()` on (or `accelerator.backward`, or a `GradScaler`'s `scale`): the same value,
        whose backward tells the hooks by how much it was scaled afterwards. Pass the task loss, before adding any
        regulariser. While not measuring, `loss` itself.

        Args:
            loss (`torch.Tensor`): The micro-batch's task loss.
            micro_batches (`int`, *optional*, defaults to 1):
                1 for a loss that is the micro-batch's own mean (the gradient-accumulation division comes after, and
                is undone); for a loss already normalised over the whole accumulated step (transformers' causal LMs
                with `num_items_in_batch`: the micro-batch's token sum over the step's label tokens), the step's
                number of micro-batches, so that the statistic is of `micro_batches × loss`, the micro-batch on the
                scale of its own mean, as without accumulation.
        """
        if not self.is_measuring:
            return loss
        return _LossGradientProbe.apply(loss, self, micro_batches)

    @torch.no_grad()
    def fold_micro_batch(self) -> None:
        """Adds the micro-batch just backpropagated to the step's sum, unless its statistic is not finite. Call it
        after every backward pass (every micro-batch, with gradient accumulation)."""
        if self._loss_grad is None:
            if any(tap.grad is not None for tap in self._taps):
                raise RuntimeError(
                    "FisherEstimator saw a backward pass whose loss did not go through `loss_to_backpropagate`: call "
                    "`estimator.loss_to_backpropagate(loss)` on the loss before `backward()` (FWLoraTrainer does it)."
                )
            return  # no backward ran since the last fold
        # One vector of this micro-batch's `‖∇W_m‖_F` (a matrix no gradient reached counts zero); the probes are
        # cleared for the next micro-batch, which draws new sketch probes.
        norms = [tap.grad if tap.grad is not None else self._zero for tap in self._taps]
        for tap in self._taps:
            tap.grad = None
        if self.kind == "sketch":
            self._draw_sketch_probes()
        self._step_sum, self._step_count = self._fold(norms, self._loss_grad, self._step_sum, self._step_count)
        self._loss_grad = None

    def _fold_norms(
        self, norms: list[torch.Tensor], loss_grad: torch.Tensor, step_sum: torch.Tensor, step_count: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's sum and count with one micro-batch's `‖∇W_m‖_F` (of the backpropagated objective) added."""
        # The taps saw the gradient of the backpropagated objective: divide the factor out before squaring (an fp16
        # loss scale would overflow the square first). The sketch's `‖(X Z)ᵀ G‖²` is k times the estimate.
        micro = (torch.stack(norms) / loss_grad.abs()).square()
        if self.kind == "sketch":
            micro = micro / self.sketch_probes
        if self.statistic == "norm":
            micro = micro.sqrt()
        finite = torch.isfinite(micro).all()
        return step_sum + torch.where(finite, micro, torch.zeros_like(micro)), step_count + finite

    @torch.no_grad()
    def end_step(self) -> None:
        """Folds the step's mean over its micro-batches (and over every process, when `torch.distributed` is
        initialised) into the average. Call it once per optimizer step, on every process."""
        totals = torch.cat([self._step_sum, self._step_count.reshape(1)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        self._running, self._num_updates, self._step_sum, self._step_count = self._average(
            totals, self._running, self._num_updates
        )

    def _average_step(
        self, totals: torch.Tensor, running: torch.Tensor, num_updates: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """The average with the step's mean (`totals`: the sums, then the count) folded in, and a zero sum and count
        for the next step."""
        step_sum, step_count = totals[:-1], totals[-1]
        step_mean = step_sum / step_count.clamp_min(1.0)
        if self.average == "ema":
            running, num_updates = ema_update(running, num_updates, step_mean, step_count > 0, self.ema_decay)
        else:
            running, num_updates = running_mean_update(running, num_updates, step_mean, step_count > 0)
        return running, num_updates, torch.zeros_like(step_sum), torch.zeros_like(step_count)

    @property
    def fisher(self) -> torch.Tensor:
        """`F`, shape `(M,)` in the order of `matrices`: the bias-corrected moving average, or the running mean (fp32,
        on the adapters' device; zero before the first step)."""
        if self.average == "ema":
            return bias_corrected(self._running, self._num_updates, self.ema_decay)
        return self._running.clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running state, to resume the measurement: the raw average (`running`) and the number of steps
        folded in (`num_updates`)."""
        return {"running": self._running.clone(), "num_updates": self._num_updates.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restores [`state_dict`] (tensors, or the lists and numbers of a JSON file) onto the adapters' device."""
        like = {"device": self._running.device, "dtype": torch.float32}
        running = torch.as_tensor(state["running"], **like)
        if running.shape != self._running.shape:
            raise ValueError(f"Got a running state of shape {tuple(running.shape)} for {len(self.matrices)} matrices.")
        self._running = running.clone()
        self._num_updates = torch.as_tensor(state["num_updates"], **like).reshape(()).clone()

    # ----- hooks ------------------------------------------------------------------------------------------------

    def _forward_hook(self, index: int, module: nn.Module, args: tuple, output: Any) -> Optional[torch.Tensor]:
        # Under `no_grad` (evaluation, the first pass of reentrant gradient checkpointing) there is nothing to measure;
        # `_measuring` false: `stop` was called (Dynamo guards on it, so compiled code recompiles without the tap).
        if not (self._measuring and torch.is_grad_enabled() and isinstance(output, torch.Tensor)):
            return None
        if not output.requires_grad:
            return None
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1])
        if self.kind == "sketch":
            # Only X Z (N × k) waits for the backward pass, not X. This runs inside the model's autocast context,
            # which would turn the product into bf16/fp16: it is switched off here.
            with autocast_disabled(x.device):
                inputs = torch.mm(x.float(), self._sketch_probes[x.shape[-1]])
        else:
            inputs = x
        return _FisherTap.apply(output, inputs, self._taps[index], self.kind == "sketch")

    @torch.no_grad()
    def _draw_sketch_probes(self) -> None:
        """New probes `Z` for the next micro-batch, one per input width, written in place (a compiled graph reads the
        same tensors)."""
        self._sketch_buffer.normal_(generator=self._generator)
