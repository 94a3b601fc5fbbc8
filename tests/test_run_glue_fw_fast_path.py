"""`run_glue_fw.py` on the fast path: `--torch_compile` with FW-LoRA trains end to end, reports what the compiler did,
and pads batches to lengths that repeat."""

import pytest
import torch
from tiny_glue_runs import common, glue_dir, read_json, run, tiny_model_dir  # noqa: F401 (fixtures)
from transformers import TrainingArguments

from fw_trainer import reset_compile_stats
from fw_trainer.glue import arguments as glue_arguments


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, None),
        ({"bf16": True}, 8),
        ({"torch_compile": True}, 32),
        ({"torch_compile": True, "bf16": True}, 32),
        ({"torch_compile": True, "pad_to_multiple_of": 16}, 16),
    ],
)
def test_padding_multiple(options, expected, tmp_path):
    data_args = glue_arguments.DataTrainingArguments(
        task_name="sst2", pad_to_multiple_of=options.pop("pad_to_multiple_of", None)
    )
    training_args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **options)
    assert glue_arguments.padding_multiple(data_args, training_args) == expected


def test_fw_lora_compiled_end_to_end(tiny_model_dir, glue_dir, tmp_path):  # noqa: F811
    torch.compiler.reset()
    reset_compile_stats()  # the counts are the process's: start them with this run
    out = tmp_path / "compiled"
    args = common(tiny_model_dir, out, "--task_name", "sst2", "--glue_dir", glue_dir, "--method", "fw_lora")
    assert run([*args, "--torch_compile", "--torch_compile_backend", "aot_eager", "--report_to", "none"]) == 0
    logs = [log for log in read_json(out / "trainer_state.json")["log_history"] if "loss" in log]
    assert [log["step"] for log in logs] == [4, 8, 12]
    assert all(log["compile/graph_breaks"] == 0 for log in logs)
    assert logs[0]["compile/graphs"] >= 1  # the warm-up (K = 4) is compiled, its measurement in the graph
    assert logs[-1]["compile/graphs"] > logs[0]["compile/graphs"] and "fw_penalty" in logs[-1]  # LoRA's graph after
    assert read_json(out / "all_results.json")["eval_accuracy"] >= 0


def test_bad_padding_multiple_is_one_clear_error(tiny_model_dir, glue_dir, tmp_path, capsys):  # noqa: F811
    args = common(tiny_model_dir, tmp_path / "out", "--task_name", "sst2", "--glue_dir", glue_dir)
    assert run([*args, "--pad_to_multiple_of", "0"]) == 2
    err = capsys.readouterr().err
    assert "--pad_to_multiple_of should be a positive integer" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
