"""`run_glue_fw.py` end to end on a tiny BERT and tiny GLUE-layout TSVs (`tiny_glue_runs`): every method and
encoder architecture trains, evaluates and writes its outputs; the saved adapter reloads, an interrupted run resumes,
and a finished run is never overwritten."""
# ruff: noqa: F811  (the fixtures imported from tiny_glue_runs are parameters of the tests below)

import csv
import glob
import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_glue_runs import common, glue_dir, read_json, run, tiny_model_dir  # noqa: F401 (fixtures)
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    RobertaConfig,
    XLMRobertaConfig,
)


ARCHITECTURE_CONFIGS = {
    "roberta": lambda vocab: RobertaConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=68, pad_token_id=0,
    ),
    "xlm-roberta": lambda vocab: XLMRobertaConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=68, pad_token_id=0,
    ),
    "electra": lambda vocab: ElectraConfig(
        vocab_size=vocab, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64,
    ),
    "deberta-v2": lambda vocab: DebertaV2Config(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
    ),
    "distilbert": lambda vocab: DistilBertConfig(
        vocab_size=vocab, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=64,
    ),
}  # fmt: skip


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURE_CONFIGS))
def test_every_architecture_from_the_command_line(model_type, tiny_model_dir, glue_dir, tmp_path):
    """Each supported encoder, saved to disk, fine-tuned with the IW-LoRA preset on the six default roles."""
    model_dir = tmp_path / model_type
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    if model_type == "distilbert":
        tokenizer.model_input_names = ["input_ids", "attention_mask"]  # DistilBERT has no segment embeddings
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = ARCHITECTURE_CONFIGS[model_type](len(tokenizer))
    AutoModelForSequenceClassification.from_config(config).save_pretrained(model_dir)

    out = tmp_path / "out"
    args = common(model_dir, out, "--task_name", "sst2", "--glue_dir", glue_dir, "--method", "iw_lora")
    assert run([*args, "--fw_warmup_steps", "2", "--report_to", "none"]) == 0
    summary = read_json(out / "adapter_summary.json")
    assert summary["model_type"] == model_type and len(summary["target_modules"]) == 12
    importance = read_json(out / "fw_importance.json")
    assert importance["frozen_at_step"] == 0 and list(importance["modules"]) == summary["target_modules"]
    assert 0.0 <= read_json(out / "all_results.json")["eval_accuracy"] <= 1.0


@pytest.mark.parametrize("method", ["lora", "adalora", "fw_lora", "iw_lora", "full"])
def test_every_method_trains_and_evaluates_sst2(method, tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / method
    extra = ["--adalora_tinit", "2", "--adalora_tfinal", "2", "--adalora_delta_t", "2"] if method == "adalora" else []
    assert (
        run(common(tiny_model_dir, out, "--task_name", "sst2", "--glue_dir", glue_dir, "--method", method, *extra))
        == 0
    )

    results = read_json(out / "all_results.json")
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and results["eval_samples"] == 32
    assert results["train_samples"] == 96 and results["train_peak_memory_mb"] > 0
    assert read_json(out / "trainer_state.json")["global_step"] == 12
    assert (out / "README.md").is_file()  # the model card
    summary = read_json(out / "adapter_summary.json")
    assert summary["method"] == method
    if method == "full":
        assert summary["trainable_params"] == summary["base_params"]
    else:
        assert len(summary["target_modules"]) == 12 and summary["rank"] == 4
        assert results["adapter_params"] == summary["adapter_params"]
    assert (out / "fw_importance.json").is_file() == (method in ("fw_lora", "iw_lora"))
    assert (out / "adalora_rank_pattern.json").is_file() == (method == "adalora")
    # The size of the saved weights (the whole model's for full fine-tuning) and the hardware, beside the results.
    environment = read_json(out / "run_environment.json")
    weights = out / ("model.safetensors" if method == "full" else "adapter_model.safetensors")
    assert environment["adapter_file_bytes"] == os.path.getsize(weights)
    assert environment["hardware"]["device_type"] == "cpu" and environment["world_size"] == 1

    # TensorBoard is on by default: the scalars come back through TensorBoard's own reader.
    event_files = glob.glob(str(out / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert event_files
    accumulator = EventAccumulator(os.path.dirname(event_files[0]))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    assert {"train/loss", "train/task_loss", "train/learning_rate", "eval/accuracy"} <= set(scalars)
    if method in ("fw_lora", "iw_lora"):
        # FW-LoRA measures during steps 1-4; IW-LoRA in a calibration before step 1, penalising from then on.
        expected_steps = [8, 12] if method == "fw_lora" else [4, 8, 12]
        assert [e.step for e in accumulator.Scalars("train/fw_penalty")] == expected_steps
        assert sum(tag.startswith("train/fw_importance/") for tag in scalars) == 12
        # The layer × role heatmap image, once, when the importances are frozen (IW-LoRA: before step 1).
        (image,) = accumulator.Images("fw_importance/heatmap")
        assert image.step == (4 if method == "fw_lora" else 0) and image.encoded_image_string.startswith(b"\x89PNG")

    # The dev predictions file scores the same accuracy as the evaluation.
    with open(out / "eval_predictions_sst2.tsv") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["index", "label", "prediction"] and len(rows) == 33
    accuracy = sum(label == prediction for _, label, prediction in rows[1:]) / 32
    assert accuracy == pytest.approx(results["eval_accuracy"])

    # ‖ΔW‖_F per matrix, recomputed from the saved LoRA factors: ‖(alpha / r) B A‖.
    if method in ("lora", "fw_lora", "iw_lora"):
        norms = read_json(out / "delta_weight_norms.json")
        weights = load_file(out / "adapter_model.safetensors")
        assert len(norms) == 12
        for name, norm in norms.items():
            a, b = (weights[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
            assert norm == pytest.approx((16 / 4 * b @ a).norm().item(), rel=1e-5)
    assert (out / "delta_weight_norms.json").is_file() == (method != "full")


def test_saved_adapter_reloads_with_peft(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "fw"
    assert run(common(tiny_model_dir, out, "--task_name", "sst2", "--glue_dir", glue_dir)) == 0
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir), out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    with open(glue_dir / "SST-2" / "dev.tsv") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    batch = tokenizer([row[0] for row in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1)
    accuracy = (predictions == torch.tensor([int(row[1]) for row in rows])).float().mean().item()
    assert accuracy == pytest.approx(read_json(out / "all_results.json")["eval_accuracy"])


def test_resume_continues_an_interrupted_run(tiny_model_dir, glue_dir, tmp_path):
    args = [*common(tiny_model_dir, tmp_path / "straight", "--task_name", "sst2", "--glue_dir", glue_dir),
            "--save_strategy", "steps", "--save_steps", "4"]  # fmt: skip
    assert run(args) == 0
    straight = read_json(tmp_path / "straight" / "all_results.json")

    # An interrupted run: checkpoints 4 and 8 exist, nothing after.
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    for step in (4, 8):
        os.system(f"cp -r {tmp_path / 'straight' / f'checkpoint-{step}'} {interrupted}")
    resumed_args = [arg if arg != str(tmp_path / "straight") else str(interrupted) for arg in map(str, args)]
    assert run(resumed_args) == 0
    resumed = read_json(interrupted / "all_results.json")
    assert read_json(interrupted / "trainer_state.json")["global_step"] == 12
    assert resumed["eval_accuracy"] == straight["eval_accuracy"]
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-5)
    assert read_json(interrupted / "fw_importance.json")["frozen_at_step"] == 4


def test_finished_run_is_never_overwritten(tiny_model_dir, glue_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = common(tiny_model_dir, out, "--task_name", "sst2", "--glue_dir", glue_dir, "--method", "lora")
    assert run(args) == 0
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}

    assert run(args) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before

    assert run([*args, "--overwrite_output_dir"]) == 0
