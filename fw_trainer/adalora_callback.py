"""AdaLoRA in a `Trainer`: drives peft's rank allocator from the optimizer steps (peft ships no such callback), and
keeps its orthogonality regulariser out of the losses that compare with other methods."""

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from peft import PeftModel
from peft.tuners.adalora import AdaLoraModel
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .arguments import resolve_schedule_steps
from .state_files import RANK_PATTERN_FILE, write_json_atomic


logger = logging.getLogger(__name__)


class AdaLoraAllocationCallback(TrainerCallback):
    r"""
    Calls `update_and_allocate(global_step)` of peft's AdaLoRA model once per optimizer step, after the optimizer step
    and before `zero_grad` (where the gradients it scores still exist), with the 0-based index of that step.

    When training begins, AdaLoRA's `total_step`, `tinit` and `tfinal` are set from the Trainer's real number of
    optimizer steps (`tinit`/`tfinal` below 1 are fractions of it). The current total rank budget is exposed as
    [`budget`] for logging, and the final rank pattern is written to `output_dir/adalora_rank_pattern.json` (and kept
    in the adapter config that `save_pretrained` writes).

    Args:
        tinit (`float`): Steps before pruning starts (a fraction of the total if below 1).
        tfinal (`float`): Final steps with a fixed rank pattern (a fraction of the total if below 1).
        adapter_name (`str`, *optional*): The AdaLoRA adapter; defaults to the one the AdaLoRA model trains.
    """

    def __init__(self, tinit: float, tfinal: float, adapter_name: Optional[str] = None):
        self.tinit = tinit
        self.tfinal = tfinal
        self.adapter_name = adapter_name
        self.budget: Optional[int] = None
        self.num_matrices: Optional[int] = None

    @staticmethod
    def _adalora_model(model) -> AdaLoraModel:
        base = model.base_model if isinstance(model, PeftModel) else model
        if not isinstance(base, AdaLoraModel):
            raise ValueError(
                "`method='adalora'` needs a peft AdaLoRA model (`get_peft_model(model, AdaLoraConfig(...))` or "
                f"`fw_trainer.build_peft_model`), but the model's base is a {type(base).__name__}."
            )
        return base

    def _adapter(self, adalora: AdaLoraModel) -> str:
        """The adapter: the one given, else the one the AdaLoRA model trains (peft allows one trainable adapter)."""
        return self.adapter_name if self.adapter_name is not None else adalora.trainable_adapter_name

    @contextmanager
    def task_loss_only(self, model: nn.Module) -> Iterator[None]:
        """
        A context in which the AdaLoRA model's loss is the task loss alone, in training and in evaluation, as for every
        other method: peft's `AdaLoraModel.forward` calls the transformers model and adds `orth_reg_weight × R` (see
        [`orthogonality_penalty`]) to its loss whenever labels are given, so its `eval_loss` would not compare with
        LoRA's. Within the context, the AdaLoRA model's forward is the transformers model's, which is all that peft's
        forward runs before it adds the regulariser; the trainer adds it back to the training loss itself.
        """
        adalora = self._adalora_model(model)
        adalora.forward = adalora.model.forward
        try:
            yield
        finally:
            del adalora.forward

    def orthogonality_penalty(self, model: nn.Module) -> torch.Tensor:
        """
        peft's AdaLoRA regulariser `R = mean over the adapter's P and Q of ‖P Pᵀ − I‖_F` (`‖QᵀQ − I‖_F` for `lora_B`),
        as `AdaLoraModel.forward` computes it, differentiable. Training with `task loss + orth_reg_weight × R` trains
        as peft intends.
        """
        adalora = self._adalora_model(model)
        total, count = None, 0
        for name, param in adalora.model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and name.endswith(f".{self._adapter(adalora)}"):
                covariance = param @ param.T if "lora_A" in name else param.T @ param
                identity = torch.eye(*covariance.size(), dtype=covariance.dtype, device=covariance.device)
                term = torch.norm(covariance - identity, p="fro")
                total, count = (term if total is None else total + term), count + 1
        return total / count

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        adalora = self._adalora_model(kwargs["model"])
        config = adalora.peft_config[self._adapter(adalora)]
        total_steps = state.max_steps
        config.total_step = total_steps
        config.tinit = resolve_schedule_steps(self.tinit, total_steps)
        config.tfinal = resolve_schedule_steps(self.tfinal, total_steps)
        if config.tinit >= total_steps - config.tfinal:
            raise ValueError(
                f"AdaLoRA's schedule does not fit in {total_steps} optimizer steps: tinit={config.tinit} must be "
                f"below total_step - tfinal = {total_steps - config.tfinal}. Lower `adalora_tinit`/`adalora_tfinal` "
                "or train for more steps."
            )
        allocator = adalora.rankallocator
        allocator.set_total_step(total_steps)
        self.num_matrices = len(allocator.name_set)
        self.budget = allocator.budget_schedule(state.global_step)[0]
        logger.info(
            "AdaLoRA schedule: %d steps, tinit=%d, tfinal=%d, deltaT=%d, total rank budget %d -> %d over %d matrices",
            total_steps,
            config.tinit,
            config.tfinal,
            config.deltaT,
            allocator.init_bgt,
            allocator.target_bgt,
            self.num_matrices,
        )

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        adalora = self._adalora_model(kwargs["model"])
        # `global_step` is incremented after this event: it is the 0-based index of the step just taken.
        adalora.update_and_allocate(state.global_step)
        self.budget = adalora.rankallocator.budget_schedule(state.global_step)[0]

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        adalora = self._adalora_model(kwargs["model"])
        config = adalora.peft_config[self._adapter(adalora)]
        if config.rank_pattern is None:
            logger.warning("AdaLoRA never allocated ranks (training too short?): no rank pattern to save.")
            return
        if state.is_world_process_zero:
            self.save_rank_pattern(config.rank_pattern, args.output_dir)

    @staticmethod
    def save_rank_pattern(rank_pattern: dict[str, list[bool]], output_dir: str) -> None:
        """Writes the rank pattern with the resulting rank of every matrix."""
        ranks = {name: int(sum(mask)) for name, mask in rank_pattern.items()}
        write_json_atomic(
            os.path.join(output_dir, RANK_PATTERN_FILE),
            {"ranks": ranks, "total_rank": sum(ranks.values()), "rank_pattern": rank_pattern},
        )
