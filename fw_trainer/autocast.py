"""Running FW-LoRA's own tensor work in fp32 whatever autocast context the Trainer or the user has entered."""

import contextlib

import torch


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """
    A context in which autocast is off for `device`'s type, so that the matrix products of the Fisher hooks and of the
    penalty run in the dtype of their inputs (fp32) rather than in autocast's bf16/fp16.

    A forward hook runs inside the model's autocast context; a tensor hook of the backward pass runs outside it on
    CUDA (another thread) but inside it on the CPU when `backward()` is called under autocast. Disabling it explicitly
    gives the same precision in every case. Device types without autocast (`meta`) get a no-op context.
    """
    if _has_autocast(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


@torch.compiler.assume_constant_result
def _has_autocast(device_type: str) -> bool:
    # Evaluated once while tracing and kept as a constant: Dynamo before torch 2.13 cannot trace the C function behind
    # `is_autocast_available` and broke the compiled warm-up's graph at every adapted layer on it.
    return torch.amp.is_autocast_available(device_type)
