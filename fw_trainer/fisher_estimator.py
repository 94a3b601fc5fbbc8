"""`FisherEstimator`: the per-matrix Fisher proxy `F_m` of the LoRA-adapted weights, measured by hooks in any training
loop (`FWLoraTrainer`, plain PyTorch, `accelerate`)."""

import weakref
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
    ...). It runs before the backward of any layer, so the layer hooks can divide it out and see the loss itself.
    """

    @staticmethod
    def forward(ctx, loss: torch.Tensor, estimator: "FisherEstimator") -> torch.Tensor:
        ctx.estimator = estimator
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        ctx.estimator._loss_grad = grad_output.detach().float()
        return grad_output, None


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
    `‖∇_{W_m} L‖_F²` (or of `‖∇_{W_m} L‖_F`), without ever storing the gradient: a forward hook keeps the layer input
    `X` (autograd keeps it for `lora_A` anyway) and a tensor hook on the layer output receives `G = ∂L/∂y`; then
    `∇W = Gᵀ X`. Frozen weights stay frozen, out of the optimizer and out of DDP's buckets.

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
            the CPU (see [`resolve_estimator`]). The attribute `estimator` holds the one in use.
        sketch_probes (`int`, *optional*, defaults to `8`): Number `k` of probes of the sketch.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sketch's own random generator (restarted by [`start`]), so that the training's random stream is
            untouched.
        adapter_name (`str`, *optional*, defaults to `"default"`): The LoRA adapter whose matrices are measured.
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
        adapter_name: str = "default",
    ):
        # The options of `FWLoraArguments` without their `fw_` prefix: checked where they are defined.
        for name, value in (
            ("statistic", statistic),
            ("average", average),
            ("ema_decay", ema_decay),
            ("estimator", estimator),
            ("sketch_probes", sketch_probes),
        ):
            check_option(f"fw_{name}", value, argument=name)
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
        self.estimator = resolve_estimator(estimator, self.matrices[0].lora_A.device)

        # The statistics live in fp32 on the adapters' device, whatever the default dtype or device.
        like = {"device": self.matrices[0].lora_A.device, "dtype": torch.float32}
        num_matrices = len(self.matrices)
        self._running = torch.zeros(num_matrices, **like)  # raw moving average, or the running mean
        self._num_updates = torch.zeros((), **like)
        self._step_sum = torch.zeros(num_matrices, **like)
        self._step_count = torch.zeros((), **like)
        # This micro-batch's `‖∇W_m‖_F` of the backpropagated (scaled) objective, each written in place by its hook:
        # one kernel per matrix, and the statistic of all of them in one go in `fold_micro_batch`.
        self._norms = torch.zeros(num_matrices, **like)
        self._loss_grad: Optional[torch.Tensor] = None  # set by `_LossGradientProbe` in the backward pass
        self._handles: list[Any] = []
        self._eager_stance: Optional[Any] = None  # `torch.compiler.set_stance("force_eager")` while measuring
        self._generator: Optional[torch.Generator] = None
        # Sketch: this micro-batch's probes per input width, and the last input sketched (query, key and value read
        # the same tensor: it is sketched once).
        self._probes: dict[int, torch.Tensor] = {}
        self._last_sketch: Optional[tuple[weakref.ref, torch.Tensor]] = None

    @classmethod
    def from_args(
        cls,
        model_or_matrices: Union[nn.Module, Sequence[AdaptedMatrix]],
        fw_args: FWLoraArguments,
        seed: int = 0,
        adapter_name: str = "default",
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
        )

    # ----- public API -------------------------------------------------------------------------------------------

    @property
    def is_measuring(self) -> bool:
        """Whether the hooks are installed (between [`start`] and [`stop`])."""
        return bool(self._handles)

    def start(self) -> None:
        """Installs the hooks: from now on every backward pass through the adapted layers is measured. Until [`stop`],
        `torch.compile`d code runs eagerly (see below)."""
        if self.is_measuring:
            return
        self._generator = None  # the probes restart from `seed`
        # `torch.compile` does not guard on module hooks: code compiled while they are installed would keep running
        # them (or keep the graph split where they are) after `stop`. So compiled code runs eagerly while measuring,
        # and compiles once, without hooks, afterwards (torch < 2.6, without stances: `stop` drops what was compiled).
        set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
        self._eager_stance = set_stance("force_eager") if set_stance is not None else None
        for index, matrix in enumerate(self.matrices):
            self._handles.append(matrix.layer.register_forward_hook(partial(self._forward_hook, index)))

    def stop(self) -> None:
        """Removes the hooks (no cost afterwards) and drops any micro-batch not folded in yet."""
        was_measuring = self.is_measuring
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._eager_stance is not None:
            self._eager_stance.__exit__(None, None, None)  # back to the stance before `start`
            self._eager_stance = None
        elif was_measuring:
            torch.compiler.reset()  # older torch: drop what was compiled with the hooks, to recompile without them
        self._norms.zero_()
        self._loss_grad = None
        self._probes, self._last_sketch = {}, None

    def loss_to_backpropagate(self, loss: torch.Tensor) -> torch.Tensor:
        """
        The loss to call `backward()` on (or `accelerator.backward`, or a `GradScaler`'s `scale`): the same value,
        whose backward tells the hooks by how much it was scaled afterwards. Pass the task loss, before adding any
        regulariser. While not measuring, `loss` itself.
        """
        if not self.is_measuring:
            return loss
        return _LossGradientProbe.apply(loss, self)

    @torch.no_grad()
    def fold_micro_batch(self) -> None:
        """Adds the micro-batch just backpropagated to the step's sum, unless its statistic is not finite. Call it
        after every backward pass (every micro-batch, with gradient accumulation)."""
        self._probes, self._last_sketch = {}, None  # the next micro-batch draws new probes
        if self._loss_grad is None:  # no backward ran since the last fold
            return
        # The hooks saw the gradient of the backpropagated objective: divide the factor out before squaring (an fp16
        # loss scale would overflow the square first). The sketch's `‖(X Z)ᵀ G‖²` is k times the estimate.
        micro = (self._norms / self._loss_grad.abs()).square()
        if self.estimator == "sketch":
            micro = micro / self.sketch_probes
        if self.statistic == "norm":
            micro = micro.sqrt()
        finite = torch.isfinite(micro).all()
        self._step_sum += torch.where(finite, micro, torch.zeros_like(micro))
        self._step_count += finite
        self._norms.zero_()
        self._loss_grad = None

    @torch.no_grad()
    def end_step(self) -> None:
        """Folds the step's mean over its micro-batches (and over every process, when `torch.distributed` is
        initialised) into the average. Call it once per optimizer step, on every process."""
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
            if self._generator is None or self._generator.device != x.device:
                self._generator = torch.Generator(device=x.device).manual_seed(self.seed)
            probes = torch.randn(
                width, self.sketch_probes, device=x.device, dtype=torch.float32, generator=self._generator
            )
            self._probes[width] = probes
        with autocast_disabled(x.device):
            sketch = torch.mm(x.detach().reshape(-1, width).float(), probes)
        self._last_sketch = (weakref.ref(x), sketch)
        return sketch

    @torch.no_grad()
    def _output_grad_hook(self, index: int, inputs: torch.Tensor, output_grad: torch.Tensor) -> None:
        if self._loss_grad is None:
            raise RuntimeError(
                "FisherEstimator saw a backward pass whose loss did not go through `loss_to_backpropagate`: call "
                "`estimator.loss_to_backpropagate(loss)` on the loss before `backward()` (FWLoraTrainer does it)."
            )
        # fp32 whatever the activations' dtype, and whether or not `backward()` was called under autocast.
        grad = output_grad.reshape(-1, output_grad.shape[-1]).float()
        with autocast_disabled(grad.device):
            if self.estimator == "sketch":
                # E‖Gᵀ X z‖² = ‖Gᵀ X‖_F² for z ~ N(0, I); (X Z)ᵀ G (k × d_out) avoids transposing the large G.
                product = torch.mm(inputs.t(), grad)
            else:
                # ∇W = Gᵀ X for y = X Wᵀ: one GEMM, the (d_out × d_in) result is dropped at once.
                product = torch.mm(grad.t(), inputs.float())
            # The norm goes straight into this matrix's slot: one reduction kernel, nothing else per matrix.
            torch.linalg.vector_norm(product, out=self._norms[index])
