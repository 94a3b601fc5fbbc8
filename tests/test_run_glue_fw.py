"""`run_glue_fw.py` end to end: a tiny BERT and a tokenizer trained in code, tiny GLUE-layout TSVs and csv files."""

import csv
import glob
import json
import os
import random
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_glue_data import MNLI_DEV_HEADER, MNLI_TRAIN_HEADER, mnli_row
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
    XLMRobertaConfig,
)

from fw_trainer.glue import run as run_glue_fw


WORDS = "good great fine nice bad awful poor sad the a movie film plot was is very not quite".split()
POSITIVE = {"good", "great", "fine", "nice"}


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved tiny BERT with a WordLevel tokenizer trained here on the task vocabulary."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator([" ".join(WORDS)] * 3, trainers.WordLevelTrainer(special_tokens=special))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=fast.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    return str(path)


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


def write_tsv(path: Path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        if header:
            writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    """SST-2 (single sentence), RTE (pair, string labels), STS-B (regression), MNLI (matched and mismatched dev) in
    the original GLUE layout."""
    root = tmp_path_factory.mktemp("glue")
    rng = random.Random(0)
    for split, size in (("train", 96), ("dev", 32)):
        sst2 = []
        for _ in range(size):
            text = sentence(rng)
            sst2.append((text, int(any(word in POSITIVE for word in text.split()))))
        write_tsv(root / "SST-2" / f"{split}.tsv", ("sentence", "label"), sst2)
        rte = [(i, sentence(rng), sentence(rng), rng.choice(["entailment", "not_entailment"])) for i in range(size)]
        write_tsv(root / "RTE" / f"{split}.tsv", ("index", "sentence1", "sentence2", "label"), rte)
        stsb = [
            (i, "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", sentence(rng), sentence(rng),
             f"{rng.uniform(0, 5):.3f}")
            for i in range(size)
        ]  # fmt: skip
        header = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
                  "score")  # fmt: skip
        write_tsv(root / "STS-B" / f"{split}.tsv", header, stsb)
    labels = ["entailment", "neutral", "contradiction"]
    mnli = {
        "train.tsv": (MNLI_TRAIN_HEADER, 96, 1),
        "dev_matched.tsv": (MNLI_DEV_HEADER, 16, 5),
        "dev_mismatched.tsv": (MNLI_DEV_HEADER, 24, 5),
    }
    for name, (header, size, votes) in mnli.items():
        rows = [mnli_row(i, sentence(rng), sentence(rng), [rng.choice(labels)] * (votes + 1)) for i in range(size)]
        (root / "MNLI").mkdir(exist_ok=True)
        (root / "MNLI" / name).write_text("".join(line + "\n" for line in [header, *rows]))
    for task, header, make in (
        ("SST-2", ("index", "sentence"), lambda i: (i, sentence(rng))),
        ("RTE", ("index", "sentence1", "sentence2"), lambda i: (i, sentence(rng), sentence(rng))),
    ):
        write_tsv(root / task / "test.tsv", header, [make(i) for i in range(10)])
    return root


def run(args) -> int:
    return run_glue_fw.main([str(a) for a in args])


def common(model_dir, output_dir, *extra):
    return [
        "--model_name_or_path", model_dir, "--output_dir", output_dir, "--do_train", "--do_eval",
        "--per_device_train_batch_size", "16", "--learning_rate", "5e-3", "--max_steps", "12", "--logging_steps", "4",
        "--lora_r", "4", "--fw_warmup_steps", "4", "--use_cpu", "--seed", "0", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def read_json(path):
    with open(path) as f:
        return json.load(f)


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


def test_pair_task_with_predictions(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "rte"
    assert run(common(tiny_model_dir, out, "--task_name", "rte", "--glue_dir", glue_dir, "--do_predict")) == 0
    with open(out / "predict_results_rte.txt") as f:
        lines = f.read().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 11
    assert {line.split("\t")[1] for line in lines[1:]} <= {"entailment", "not_entailment"}
    assert "eval_accuracy" in read_json(out / "eval_results.json")


def test_regression_task(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "stsb"
    args = common(tiny_model_dir, out, "--task_name", "stsb", "--glue_dir", glue_dir)
    # The saved tiny model has a 2-class head: a regression head needs the flag, as in run_glue.
    assert run(args) == 2
    assert run([*args, "--ignore_mismatched_sizes"]) == 0
    results = read_json(out / "eval_results.json")
    assert {"eval_pearson", "eval_spearmanr", "eval_combined_score"} <= set(results)
    assert results["eval_combined_score"] == pytest.approx((results["eval_pearson"] + results["eval_spearmanr"]) / 2)


def test_mnli_is_evaluated_matched_and_mismatched(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "mnli"
    args = common(tiny_model_dir, out, "--task_name", "mnli", "--glue_dir", glue_dir, "--ignore_mismatched_sizes")
    assert run(args) == 0
    results = read_json(out / "eval_results.json")
    assert (results["eval_samples"], results["eval_samples_mm"]) == (16, 24)
    assert {"eval_accuracy", "eval_accuracy_mm"} <= set(results)


def write_csv(path, rows, columns):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


def test_own_csv_files_with_string_labels(tiny_model_dir, tmp_path):
    rng = random.Random(1)
    rows = [(sentence(rng), rng.choice(["neg", "pos"])) for _ in range(48)]
    write_csv(tmp_path / "train.csv", rows, ("text", "label"))
    write_csv(tmp_path / "dev.csv", rows[:16], ("text", "label"))
    write_csv(tmp_path / "test.csv", [(r[0],) for r in rows[:5]], ("text",))
    out = tmp_path / "out"
    args = common(
        tiny_model_dir, out, "--train_file", tmp_path / "train.csv", "--validation_file", tmp_path / "dev.csv"
    )
    assert run([*args, "--test_file", tmp_path / "test.csv", "--do_predict"]) == 0
    with open(out / "predict_results_custom.txt") as f:
        assert {line.split("\t")[1] for line in f.read().splitlines()[1:]} <= {"neg", "pos"}


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


def test_yaml_config_with_command_line_override(tiny_model_dir, glue_dir, tmp_path):
    config = {
        "model_name_or_path": tiny_model_dir, "task_name": "sst2", "glue_dir": str(glue_dir), "method": "lora",
        "do_train": True, "do_eval": True, "max_steps": 2, "per_device_train_batch_size": 8, "use_cpu": True,
        "lora_target_modules": ["query", "value"], "report_to": "none", "output_dir": str(tmp_path / "out"),
    }  # fmt: skip
    with open(tmp_path / "run.yaml", "w") as f:
        yaml.safe_dump(config, f)
    assert run([tmp_path / "run.yaml", "--max_steps", "3"]) == 0
    assert read_json(tmp_path / "out" / "trainer_state.json")["global_step"] == 3
    summary = read_json(tmp_path / "out" / "adapter_summary.json")
    assert summary["method"] == "lora" and len(summary["target_modules"]) == 4
    assert not (tmp_path / "out" / "runs").exists()  # report_to none from the file was respected


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_task", "Unknown task 'sst3'"),
        ("mismatched_columns", "has the columns"),
        ("mixed_formats", "all be csv or all be json"),
        ("budget_too_small", "too small for rank 1"),
        ("offline_model", "pass a local directory"),
        ("missing_glue_file", "GLUE"),
        ("fp16_on_cpu", "--fp16 needs a GPU"),
    ],
)
def test_bad_input_is_one_clear_error(case, message, tiny_model_dir, glue_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    write_csv(tmp_path / "train.csv", [("a b", 0), ("c d", 1)], ("text", "label"))
    write_csv(tmp_path / "dev.csv", [("a b", "x", 0)], ("text", "other", "label"))
    args = {
        "unknown_task": ["--task_name", "sst3"],
        "mismatched_columns": ["--train_file", tmp_path / "train.csv", "--validation_file", tmp_path / "dev.csv"],
        "mixed_formats": ["--train_file", tmp_path / "train.csv", "--validation_file", tmp_path / "dev.json"],
        "budget_too_small": ["--task_name", "sst2", "--glue_dir", glue_dir, "--lora_budget", "0.001"],
        "offline_model": ["--task_name", "sst2", "--glue_dir", glue_dir],
        "missing_glue_file": ["--task_name", "cola", "--glue_dir", glue_dir],
        "fp16_on_cpu": ["--task_name", "sst2", "--glue_dir", glue_dir, "--fp16"],
    }[case]
    model = tiny_model_dir
    if case == "offline_model":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        model = "no-such-org/no-such-model"
    base = common(model, out)
    base.remove("--lora_r"), base.remove("4")
    assert run([*base, *args]) == 2
    stderr = capsys.readouterr().err
    error = stderr.split("\nerror: ")[-1] if "\nerror: " in stderr else stderr.removeprefix("error: ")
    assert stderr.startswith("error: ") or "\nerror: " in stderr
    assert message in error and "Traceback" not in stderr and len(error.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_finished_run_is_never_overwritten(tiny_model_dir, glue_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = common(tiny_model_dir, out, "--task_name", "sst2", "--glue_dir", glue_dir, "--method", "lora")
    assert run(args) == 0
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}

    assert run(args) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before

    assert run([*args, "--overwrite_output_dir"]) == 0
