"""Real two-process DDP (torchrun, gloo, CPU) against one process with gradient accumulation on the same batches."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from ddp_worker import BATCH_SIZE, MAX_STEPS, WARMUP_STEPS, build_trainer, results


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_worker.py")
NUM_PROCESSES = 2
TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(output_dir, worker: str = WORKER) -> None:
    """Runs `worker OUTPUT_DIR` in NUM_PROCESSES processes under torchrun (gloo, CPU, one thread each)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(NUM_PROCESSES),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        worker,
        str(output_dir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    # Drop any distributed variables of an outer launcher: torchrun sets its own.
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s.\nstdout:\n{error.stdout}\nstderr:\n{error.stderr}")
    assert proc.returncode == 0, (
        f"torchrun failed ({proc.returncode}).\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)
def test_fisher_under_ddp_matches_single_process_gradient_accumulation(tmp_path):
    """
    Two DDP ranks (4 rows each per step) must end with bitwise-identical Fisher values and importances, and these
    must equal those of one process with gradient accumulation 2 whose step t sees the same two 4-row micro-batches:
    F's per-step statistic is the mean over every micro-batch on every rank of that micro-batch's own squared gradient
    norm, whatever the split between ranks and accumulation. The trained LoRA weights must agree too (DDP averages
    the two micro-batch gradients, FWLoraTrainer's GA division does the same in one process).
    """
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    run_torchrun(ddp_dir)
    ranks = [torch.load(ddp_dir / f"rank{rank}.pt", weights_only=False) for rank in range(NUM_PROCESSES)]

    # Single-process reference: with a sequential sampler, batch size 4 and GA 2, step t reads batches 2t and 2t+1.
    single = build_trainer(str(tmp_path / "single"), gradient_accumulation_steps=NUM_PROCESSES)
    assert single.args.world_size == 1
    single.train()
    reference = results(single)

    # The premise: accelerate's `BatchSamplerShard` (split_batches=False) deals sequential batches round-robin, so
    # rank r's step t is batch 2t + r, i.e. micro-batch 2t + r of the single process.
    dataset_ids = single.train_dataset.input_ids
    assert len(reference["seen_input_ids"]) == NUM_PROCESSES * MAX_STEPS
    for rank, result in enumerate(ranks):
        assert len(result["seen_input_ids"]) == MAX_STEPS
        for step, ids in enumerate(result["seen_input_ids"]):
            batch = NUM_PROCESSES * step + rank
            torch.testing.assert_close(ids, dataset_ids[batch * BATCH_SIZE : (batch + 1) * BATCH_SIZE], rtol=0, atol=0)
            torch.testing.assert_close(ids, reference["seen_input_ids"][batch], rtol=0, atol=0)

    # 1. The all-reduce leaves every rank with exactly the same estimate.
    for result in ranks:
        assert result["frozen_at_step"] == WARMUP_STEPS
        torch.testing.assert_close(result["fisher"], ranks[0]["fisher"], rtol=0, atol=0)
        torch.testing.assert_close(result["importances"], ranks[0]["importances"], rtol=0, atol=0)

    # 2. ... and it is the single-process estimate over the same micro-batches.
    assert reference["frozen_at_step"] == WARMUP_STEPS
    assert (reference["fisher"] > 0).all()
    torch.testing.assert_close(ranks[0]["fisher"], reference["fisher"], rtol=1e-5, atol=0)
    torch.testing.assert_close(ranks[0]["importances"], reference["importances"], rtol=1e-5, atol=0)

    # 3. Same gradients at every step, so the same LoRA weights (DDP keeps the ranks' copies identical).
    assert reference["lora_weights"] and ranks[0]["lora_weights"].keys() == reference["lora_weights"].keys()
    # lora_B starts at zero: a non-zero one proves the optimizer really stepped, so the comparison is not vacuous.
    assert any(w.abs().max() > 0 for name, w in reference["lora_weights"].items() if "lora_B" in name)
    for name, weight in reference["lora_weights"].items():
        torch.testing.assert_close(ranks[1]["lora_weights"][name], ranks[0]["lora_weights"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["lora_weights"][name], weight, rtol=1e-5, atol=1e-6, msg=name)

    # 4. The logged training metrics are averages over all ranks, like the single process's over its micro-batches.
    assert len(ranks[0]["logs"]) == len(reference["logs"]) == 1
    for name in ("loss", "task_loss", "fw_penalty"):
        assert ranks[0]["logs"][0][name] == ranks[1]["logs"][0][name]
        assert ranks[0]["logs"][0][name] == pytest.approx(reference["logs"][0][name], rel=1e-5), name
