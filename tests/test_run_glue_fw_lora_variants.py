"""`run_glue_fw.py` with peft's LoRA variants as baselines (`--use_dora`, `--use_rslora`, `--init_lora_weights`),
recorded in the run's identity; refused for FW-LoRA where it would measure them wrong; and a decoder classifier
(`LlamaForSequenceClassification`) through the script."""
# ruff: noqa: F811  (the fixtures imported from tiny_glue_runs are parameters of the tests below)

import pytest
import torch
from test_run_glue_fw_faults import error_paragraph, tree
from tiny_glue_runs import common, glue_dir, read_json, run, tiny_model_dir  # noqa: F401  (module-scoped fixtures)
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification


def script(model_dir, glue, out, *extra):
    return [*common(model_dir, out, "--task_name", "sst2", "--glue_dir", glue, "--report_to", "none"), *extra]


@pytest.mark.parametrize(
    "flags, recorded",
    [
        (["--use_dora"], {"use_dora": True}),
        (["--use_rslora"], {"use_rslora": True}),
        (["--init_lora_weights", "pissa"], {"init_lora_weights": "pissa"}),
    ],
    ids=["dora", "rslora", "pissa"],
)
def test_a_lora_variant_is_a_baseline_recorded_in_the_identity(flags, recorded, tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "out"
    assert run(script(tiny_model_dir, glue_dir, out, "--method", "lora", *flags)) == 0
    identity = read_json(out / "fw_run_identity.json")["run"]
    adapter = read_json(out / "adapter_config.json")
    for option, value in recorded.items():
        assert identity[option] == value and adapter[option] == value
    # Only the chosen variant is recorded: a plain run's identity has none of them.
    assert not {"use_dora", "use_rslora", "init_lora_weights"} - set(recorded) & set(identity)


@pytest.mark.parametrize("flags", [["--use_dora"], ["--init_lora_weights", "olora"]], ids=["dora", "olora"])
@pytest.mark.parametrize("method", ["fw_lora", "iw_lora"])
def test_fw_lora_refuses_a_variant_it_would_measure_wrong(method, flags, tiny_model_dir, glue_dir, tmp_path, capsys):
    before = tree(tmp_path)
    assert run(script(tiny_model_dir, glue_dir, tmp_path / "out", "--method", method, *flags)) == 2
    error = error_paragraph(capsys.readouterr().err)
    assert flags[0] in error and "--method lora" in error
    assert tree(tmp_path) == before


def test_fw_lora_with_rslora_measures_the_rslora_adapter(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "out"
    assert run(script(tiny_model_dir, glue_dir, out, "--method", "fw_lora", "--use_rslora")) == 0
    assert read_json(out / "adapter_config.json")["use_rslora"] is True
    assert read_json(out / "fw_importance.json")["frozen_at_step"] == 4


def test_a_decoder_classifier_through_the_script(tiny_model_dir, glue_dir, tmp_path):
    """LlamaForSequenceClassification (pad token set): default decoder targets, the `score` head trained, FW-LoRA's
    importances over layers × roles."""
    model_dir = tmp_path / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, num_labels=2,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(model_dir)

    out = tmp_path / "out"
    assert run(script(model_dir, glue_dir, out, "--method", "fw_lora")) == 0
    summary = read_json(out / "adapter_summary.json")
    roles = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert len(summary["target_modules"]) == 14 and {
        name.rsplit(".", 1)[-1] for name in summary["target_modules"]
    } == set(roles)
    assert summary["head_params"] == 2 * 16
    assert list(read_json(out / "fw_importance.json")["modules"]) == summary["target_modules"]
    assert 0.0 <= read_json(out / "all_results.json")["eval_accuracy"] <= 1.0
