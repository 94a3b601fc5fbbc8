"""
What a run cost to keep and where it ran, as peft's `method_comparison` records them for each run: the size of the
weights file(s) a run saves ([`adapter_file_bytes`]: the adapter, or the whole model of a full fine-tuning) and the
hardware and library versions it trained on ([`hardware`]).
"""

import glob
import os
import platform
from typing import Any, Optional, Union

import peft
import torch
import transformers

from .adapted_matrices import adapter_directory
from .state_files import write_json_atomic
from .version import __version__


# The weights a run saves, by kind, in order of precedence: the first kind with a file in the directory is counted (a
# model saved both as safetensors and as a pickle is counted once). Sharded files come with an index.
WEIGHTS_FILES = (
    ("adapter_model.safetensors",),
    ("adapter_model.bin",),
    ("model.safetensors", "model-*-of-*.safetensors"),
    ("pytorch_model.bin", "pytorch_model-*-of-*.bin"),
)


# Written by [`write_run_environment`] beside a run's weights.
RUN_ENVIRONMENT_FILE = "run_environment.json"


def adapter_file_bytes(output_dir: str, adapter_name: str = "default") -> Optional[int]:
    """
    The size on disk of the weights a run saved into `output_dir`: `adapter_model.safetensors` for an adapter, else
    `model.safetensors` or its shards for a full fine-tuning (the pickled `.bin` files where no safetensors were
    saved). What peft's `method_comparison` records as `file_size`.

    Args:
        output_dir (`str`): The directory the model was saved into (`trainer.save_model()`, `save_pretrained`).
        adapter_name (`str`, *optional*, defaults to `"default"`):
            The adapter: peft saves one not named `"default"` in a subfolder of that name.

    Returns:
        `int` or `None`: The bytes of the weights file(s), summed over shards; `None` if the directory holds none.
    """
    directory = glob.escape(adapter_directory(output_dir, adapter_name))
    for patterns in WEIGHTS_FILES:
        paths = {path for pattern in patterns for path in glob.glob(os.path.join(directory, pattern))}
        if paths:
            return sum(os.path.getsize(path) for path in paths)
    return None


def cpu_name() -> str:
    """The CPU's model name: `model name` in `/proc/cpuinfo` on Linux, else what `platform` knows (may be the
    architecture only, e.g. `arm64`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux
    return platform.processor() or platform.machine() or "unknown"


def _accelerator_count() -> int:
    # `torch.accelerator` (torch 2.6 and later) also counts the devices of other backends (XPU, MPS).
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.device_count()
    return torch.cuda.device_count()


def hardware(device: Optional[Union[torch.device, str]] = None) -> dict[str, Any]:
    """
    Where a run trains: its device and the machine around it, with the versions of the libraries that ran it.

    Args:
        device (`torch.device` or `str`, *optional*): The device the run trains on (`TrainingArguments.device`);
            defaults to the first GPU where CUDA is available, else the CPU.

    Returns:
        `dict`: `device_type` (`cuda`, `cpu`, ...), `device_name` (the GPU's name on CUDA, else the CPU's model),
        `accelerator_count` (the accelerators visible to the process, used or not), `cpu_name`, `cpu_threads` (the
        threads torch computes with on the CPU), and the `torch`, `transformers`, `peft` and `fw-lora` versions.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    cpu = cpu_name()
    return {
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "accelerator_count": _accelerator_count(),
        "cpu_name": cpu,
        "cpu_threads": torch.get_num_threads(),
        "torch": str(torch.__version__),  # a `TorchVersion`, a `str` subclass
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "fw-lora": __version__,
    }


def write_run_environment(
    output_dir: str, device: torch.device, world_size: int = 1, adapter_name: str = "default"
) -> None:
    """
    Writes `run_environment.json`: `adapter_file_bytes`, the size of the weights the run saved into `output_dir` (see
    [`adapter_file_bytes`]; `None` if it saved none), the `hardware` it trained on (see [`hardware`]) and `world_size`,
    the number of processes that trained. Call it after the model is saved.

    Args:
        output_dir (`str`): The run's output directory.
        device (`torch.device`): The device this process trained on (`TrainingArguments.device`).
        world_size (`int`, *optional*, defaults to 1): `TrainingArguments.world_size`.
        adapter_name (`str`, *optional*, defaults to `"default"`): The peft adapter that was saved.
    """
    environment = {
        "adapter_file_bytes": adapter_file_bytes(output_dir, adapter_name),
        "hardware": hardware(device),
        "world_size": world_size,
    }
    write_json_atomic(os.path.join(output_dir, RUN_ENVIRONMENT_FILE), environment)
