"""Every method, estimator and warm-up mode under mixed precision on the CPU: bf16 through `run_glue_fw.py --bf16
--use_cpu`, and fp16 autocast with a real `GradScaler` through `FWLoraTrainer`, against fp32 runs on the same batches.

On a GPU the same code runs under CUDA autocast; these tests are what CI can see of it (the sketch's bf16 crash
reproduced here on the CPU).
"""
# ruff: noqa: F811  (the fixtures imported from tiny_glue_runs are parameters of the tests below)

import math

import pytest
import torch
from conftest import TokenDataset, lora_model, training_args
from tiny_glue_runs import common, glue_dir, read_json, run, tiny_model_dir  # noqa: F401 (fixtures)

from fw_trainer import FWLoraTrainer
from fw_trainer.measurement import peak_memory_mb, reset_peak_memory


def fisher_and_importances(output_dir) -> tuple[torch.Tensor, torch.Tensor]:
    saved = read_json(output_dir / "fw_importance.json")
    assert saved["frozen"]
    rows = saved["modules"].values()
    return torch.tensor([row["fisher"] for row in rows]), torch.tensor([row["importance"] for row in rows])


def assert_close_to_fp32(bf16_dir, fp32_dir) -> None:
    """
    Within bf16's precision. bf16 autocast runs the whole forward and backward with an 8-bit mantissa, so every output
    gradient `G` the hooks receive is about 1 % off, and a matrix's `‖Gᵀ X‖²` sums many such products: on the tiny
    random-weight BERT, with the same weights and batches, `Σ F` moves by 2-5 % and the importances by up to 7.5 % of
    the largest one (measured). The hooks add nothing to that: they compute in fp32 (`test_fisher_callback` compares
    them with autograd). `Σ F` pins the scale, which normalised importances cannot see (a loss scale or a
    gradient-accumulation factor left in would multiply every `F` alike).
    """
    fisher, importance = fisher_and_importances(bf16_dir)
    fisher_fp32, importance_fp32 = fisher_and_importances(fp32_dir)
    assert torch.isfinite(fisher).all() and torch.isfinite(importance).all()
    assert fisher.sum().item() == pytest.approx(fisher_fp32.sum().item(), rel=0.1)
    torch.testing.assert_close(importance, importance_fp32, rtol=0, atol=0.1 * importance_fp32.max().item())


METHOD_ARGUMENTS = {
    "lora": [],
    "adalora": ["--adalora_tinit", "2", "--adalora_tfinal", "2", "--adalora_delta_t", "2"],
    "full": [],
    "fw_lora": ["--fw_estimator", "sketch"],
    "iw_lora": [],
}


@pytest.mark.parametrize("method", sorted(METHOD_ARGUMENTS))
def test_every_method_trains_under_bf16(method, tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / method
    extra = METHOD_ARGUMENTS[method]
    args = common(tiny_model_dir, out, "--task_name", "sst2", "--glue_dir", glue_dir, "--method", method, *extra)
    assert run([*args, "--bf16"]) == 0
    results = read_json(out / "all_results.json")
    assert math.isfinite(results["train_loss"]) and math.isfinite(results["eval_loss"])
    assert results["train_peak_memory_kind"] == "cpu_max_rss" and results["train_peak_memory_mb"] > 0
    if method in ("fw_lora", "iw_lora"):
        penalties = [
            log["fw_penalty"] for log in read_json(out / "trainer_state.json")["log_history"] if "fw_penalty" in log
        ]
        assert penalties and all(math.isfinite(value) and value > 0 for value in penalties)


@pytest.mark.parametrize("mode", ["train", "calibrate"])
@pytest.mark.parametrize("estimator", ["exact", "sketch"])
@pytest.mark.parametrize("method", ["fw_lora", "iw_lora"])
def test_fisher_methods_under_bf16_match_fp32(method, estimator, mode, tiny_model_dir, glue_dir, tmp_path):
    # The same weights and batches in both runs (learning rate 0), so that only the precision differs; many probes,
    # so that the sketch's own noise (the same probes in both runs) stays below bf16's.
    extra = [
        "--fw_estimator",
        estimator,
        "--fw_warmup_mode",
        mode,
        "--fw_sketch_probes",
        "256",
        "--learning_rate",
        "0",
    ]
    args = common(tiny_model_dir, None, "--task_name", "sst2", "--glue_dir", glue_dir, "--method", method, *extra)
    outputs = {}
    for precision in ("fp32", "bf16"):
        outputs[precision] = tmp_path / precision
        args[args.index("--output_dir") + 1] = outputs[precision]
        assert run([*args, "--bf16"] if precision == "bf16" else args) == 0

    assert read_json(outputs["bf16"] / "fw_importance.json")["estimator"] == estimator
    assert_close_to_fp32(outputs["bf16"], outputs["fp32"])
    results = read_json(outputs["bf16"] / "all_results.json")
    assert math.isfinite(results["train_loss"]) and math.isfinite(results["eval_loss"])


def fp16_autocast_with_grad_scaler(trainer: FWLoraTrainer) -> None:
    """What accelerate sets up for `--fp16` on a GPU, on the CPU: fp16 autocast around the model's forward (it wraps
    the forward when the model is prepared) and a dynamic `GradScaler` for the backward and the optimizer step.
    accelerate itself silently trains in fp32 for `fp16=True` on a CPU."""
    trainer.accelerator.native_amp = True
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)


@pytest.mark.parametrize("mode", ["train", "calibrate"])
@pytest.mark.parametrize("estimator", ["exact", "sketch"])
def test_fp16_autocast_with_grad_scaler_matches_fp32(tmp_path, estimator, mode):
    fisher = {}
    for precision in ("fp32", "fp16"):
        model, fw_args = lora_model(
            fw_warmup_steps=2, fw_estimator=estimator, fw_warmup_mode=mode, fw_sketch_probes=256, fw_lambda=1e-1
        )
        trainer = FWLoraTrainer(
            model=model,
            args=training_args(
                tmp_path / precision, max_steps=4, fp16=precision == "fp16", gradient_accumulation_steps=2
            ),
            train_dataset=TokenDataset(size=64),
            fw_args=fw_args,
        )
        if precision == "fp16":
            fp16_autocast_with_grad_scaler(trainer)
        trainer.train()
        if precision == "fp16":
            # The scaler really scaled the loss (by 1,024 at least), and the forward really ran in fp16.
            assert trainer.accelerator.scaler.get_scale() >= 2.0**10
            with trainer.accelerator.autocast():
                assert torch.get_autocast_dtype("cpu") == torch.float16 and torch.is_autocast_enabled("cpu")
        fisher[precision] = trainer.fisher_callback.fisher
        assert fisher[precision].dtype == torch.float32 and torch.isfinite(fisher[precision]).all()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    # fp16 has a 10-bit mantissa, and the loss scale is divided out exactly: F agrees to about 1 %, but not bit for bit
    # (which would mean that autocast never ran).
    assert not torch.equal(fisher["fp16"], fisher["fp32"])
    torch.testing.assert_close(fisher["fp16"], fisher["fp32"], rtol=2e-2, atol=0)


def test_peak_memory_is_read_from_the_device_the_run_trains_on(monkeypatch):
    """A `--use_cpu` run on a machine with a GPU reports the process's peak RSS, not CUDA's (zero) peak allocation."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *args: None)
    reset_peak_memory(torch.device("cpu"))
    value, kind = peak_memory_mb(torch.device("cpu"))
    assert kind == "cpu_max_rss" and value > 0


@pytest.mark.gpu
def test_use_cpu_on_a_gpu_machine_reports_cpu_peak_memory(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "cpu-run"
    assert run(common(tiny_model_dir, out, "--task_name", "sst2", "--glue_dir", glue_dir)) == 0
    results = read_json(out / "all_results.json")
    assert results["train_peak_memory_kind"] == "cpu_max_rss" and results["train_peak_memory_mb"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_fw_lora_on_cuda_reports_cuda_peak_memory(precision, tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "gpu-run"
    args = common(tiny_model_dir, out, "--task_name", "sst2", "--glue_dir", glue_dir, precision)
    args.remove("--use_cpu")
    assert run(args) == 0
    results = read_json(out / "all_results.json")
    assert results["train_peak_memory_kind"] == "cuda_max_memory_allocated" and results["train_peak_memory_mb"] > 0
    assert math.isfinite(results["train_loss"])
    assert all(torch.isfinite(values).all() for values in fisher_and_importances(out))
