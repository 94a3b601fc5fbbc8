"""
The operators that FW-LoRA's penalty adds to one training step, counted with `torch.profiler` three ways, every LoRA
parameter already holding a gradient as in training. Prints the counts as JSON.

    python benchmarks/penalty_ops.py                   # roberta-base shape (random weights, no download)
    python benchmarks/penalty_ops.py --device cuda --output penalty_ops.json

- `autograd`: `penalty()` then `.backward()` (the differentiable scalar added to a loss: any training loop);
- `fused`: `penalty.backward(λ)`, the analytic gradient added into `.grad` with `torch._foreach_add_` (what
  `FWLoraTrainer` runs);
- `per_matrix_loop`: a plain Python sum of `w ‖ΔW‖²` over the matrices, through autograd.

Each reports `aten_ops`, the operators that launch a kernel (`fw_trainer.measurement.launched_operators`, the
definition the tests use: outermost `aten::` operators, not their own sub-calls, views or no-op copies), split into
`gradient_accumulation` (autograd's `AccumulateGrad`, one `add_` into the existing `.grad` per LoRA tensor) and the
penalty's `own`; with `--device cuda` also the CUDA kernels.
"""

import json
import os
import sys
from typing import Any

import torch

from fw_trainer import FisherWeightedPenalty, FWLoraArguments, build_peft_model, find_adapted_matrices
from fw_trainer.measurement import count_kernels, launched_operators


# The sibling module, also when this file is imported by its path (the tests) rather than run.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def count_penalty_ops(model, device: torch.device, scale: float) -> dict:
    """The penalty's operators in one step of `model` (a peft model with its LoRA matrices), the three ways above."""
    matrices = find_adapted_matrices(model)
    weights = torch.rand(len(matrices), device=device)
    penalty = FisherWeightedPenalty(matrices, weights)

    def looped():
        return sum(w * m.layer.get_delta_weight(m.adapter_name).pow(2).sum() for w, m in zip(weights, matrices))

    paths = {
        "autograd": lambda: penalty().backward(),
        "fused": lambda: penalty.backward(scale),
        "per_matrix_loop": lambda: looped().backward(),
    }
    counts: dict[str, Any] = {"matrices": len(matrices), "lora_parameters": 2 * len(matrices)}
    counts["groups"] = penalty.num_groups
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for name, run in paths.items():
        for matrix in matrices:
            for parameter in (matrix.lora_A, matrix.lora_B):
                parameter.grad = torch.zeros_like(parameter)
        run()  # untimed, unprofiled: lazy initialisation (cuBLAS handles, ...) out of the count
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with torch.profiler.profile(activities=activities) as profile:
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        operators = sum(launched_operators(profile).values())
        accumulation = sum(1 for event in profile.events() if event.name == "torch::autograd::AccumulateGrad")
        counts[name] = {
            "aten_ops": operators,
            "own": operators - accumulation,
            "gradient_accumulation": accumulation,
            "cuda_kernels": count_kernels(profile, "cuda") if device.type == "cuda" else None,
        }
    model.zero_grad(set_to_none=True)
    return counts


def main():
    args = common.make_parser(__doc__).parse_args()
    fw_args = FWLoraArguments(method="fw_lora")
    model, _ = build_peft_model(common.build_model(args.model, args.config_overrides), fw_args)
    figures = count_penalty_ops(model.to(args.device), torch.device(args.device), fw_args.fw_lambda)
    figures["counted"] = "launched outermost aten ops" + (" and CUDA kernels" if args.device == "cuda" else "")
    print(json.dumps(figures, indent=2))
    common.write_figures(figures, args)


if __name__ == "__main__":
    main()
