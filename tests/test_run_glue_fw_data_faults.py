"""`run_glue_fw.py` on your own csv/json files with bad rows (`tiny_glue_runs`): an empty or null text, a missing or
null label, a validation file without labels, whole-number float labels, a text column of numbers. Each is one
`error:` paragraph that names the file and the row, exit status 2, with nothing written; a test file without labels
still loads."""
# ruff: noqa: F811  (the fixtures imported from tiny_glue_runs are parameters of the tests below)

import json
import random

import pytest
from test_run_glue_fw_faults import error_paragraph
from tiny_glue_runs import common, run, sentence, tiny_model_dir, write_csv  # noqa: F401


def labelled(rows: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(sentence(rng), i % 2) for i in range(rows)]


def write_json(path, records) -> None:
    """JSON Lines: one record per line."""
    with open(path, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def records(rows) -> list[dict]:
    return [{"sentence": text, "label": label} for text, label in rows]


def csv_files(tmp_path, train=None, dev=None, columns=("sentence", "label")):
    """A train and a validation csv, with `train`/`dev` rows instead of good ones where given."""
    write_csv(tmp_path / "train.csv", train or labelled(8), columns)
    write_csv(tmp_path / "dev.csv", dev or labelled(4, seed=1), columns)
    return tmp_path / "train.csv", tmp_path / "dev.csv"


def json_files(tmp_path, train=None, dev=None):
    """A train and a validation JSON Lines file, with `train`/`dev` records instead of good ones where given."""
    write_json(tmp_path / "train.json", train or records(labelled(8)))
    write_json(tmp_path / "dev.json", dev or records(labelled(4, seed=1)))
    return tmp_path / "train.json", tmp_path / "dev.json"


def replaced(rows, index, row):
    return [row if i == index else r for i, r in enumerate(rows)]


def empty_sentence_csv(tmp_path):
    return "train", 3, csv_files(tmp_path, train=replaced(labelled(8), 2, ("", 1))), ["no text", "`sentence`"]


def blank_sentence_json(tmp_path):
    train = replaced(records(labelled(8)), 4, {"sentence": "   ", "label": 0})
    return "train", 5, json_files(tmp_path, train=train), ["empty text", "`sentence`"]


def null_sentence_json(tmp_path):
    dev = replaced(records(labelled(4, seed=1)), 1, {"sentence": None, "label": 1})
    return "validation", 2, json_files(tmp_path, dev=dev), ["no text", "null"]


def missing_label_csv_train(tmp_path):
    return "train", 4, csv_files(tmp_path, train=replaced(labelled(8), 3, ("a movie", ""))), ["no label"]


def missing_label_csv_validation(tmp_path):
    dev = replaced(labelled(4, seed=1), 0, ("a movie", ""))
    return "validation", 1, csv_files(tmp_path, dev=dev), ["no label", "only the --test_file may be unlabelled"]


def null_label_json(tmp_path):
    train = replaced(records(labelled(8)), 6, {"sentence": "a movie", "label": None})
    return "train", 7, json_files(tmp_path, train=train), ["no label", "null"]


def empty_class_name_json(tmp_path):
    train = [{"sentence": text, "label": ["neg", "pos"][label]} for text, label in labelled(8)]
    dev = [{"sentence": text, "label": ["neg", "pos"][label]} for text, label in labelled(4, seed=1)]
    dev = replaced(dev, 2, {"sentence": "a movie", "label": " "})
    return "validation", 3, json_files(tmp_path, train=train, dev=dev), ["no label", "an empty class name"]


def infinite_label_csv(tmp_path):
    train = [(text, float(label) + 0.5) for text, label in labelled(8)]
    return "train", 2, csv_files(tmp_path, train=replaced(train, 1, ("a movie", "inf"))), ["finite number"]


def sentence_column_of_numbers(tmp_path):
    rows = [(i, text, label) for i, (text, label) in enumerate(labelled(8))]
    files = csv_files(tmp_path, train=rows, dev=rows[:4], columns=("idx", "sentence", "label"))
    return "train", None, files, ["`idx` column", "not text", "sentence1"]


def validation_without_labels(tmp_path):
    train, _ = csv_files(tmp_path)
    write_csv(tmp_path / "dev.csv", [(text,) for text, _ in labelled(4)], ("sentence",))
    return "validation", None, (train, tmp_path / "dev.csv"), ["no `label` column", "--test_file"]


def whole_number_floats_csv(tmp_path):
    rows = [(text, f"{label:.1f}") for text, label in labelled(8)]
    files = csv_files(tmp_path, train=rows, dev=rows[:4])
    return "train", None, files, ["read as floats", "whole numbers: 0.0, 1.0", "regression", "as integers (0, 1)"]


def whole_number_floats_json(tmp_path):
    train = [{"sentence": text, "label": float(label)} for text, label in labelled(8)]
    return "train", None, json_files(tmp_path, train=train), ["read as floats", "as integers (0, 1)"]


def only_a_label_column(tmp_path):
    write_csv(tmp_path / "train.csv", [(i % 2,) for i in range(8)], ("label",))
    write_csv(tmp_path / "dev.csv", [(i % 2,) for i in range(4)], ("label",))
    return "train", None, (tmp_path / "train.csv", tmp_path / "dev.csv"), ["no column besides `label`"]


# Each case writes the files and returns the split at fault, its row (or None), the files, and what the error says.
CASES = [
    empty_sentence_csv,
    blank_sentence_json,
    null_sentence_json,
    missing_label_csv_train,
    missing_label_csv_validation,
    null_label_json,
    empty_class_name_json,
    infinite_label_csv,
    sentence_column_of_numbers,
    validation_without_labels,
    whole_number_floats_csv,
    whole_number_floats_json,
    only_a_label_column,
]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_a_bad_row_is_one_paragraph_naming_the_file_and_row(case, tiny_model_dir, tmp_path, capsys):
    split, row, (train, dev), phrases = case(tmp_path)
    out = tmp_path / "new" / "out"
    assert run(common(tiny_model_dir, out, "--train_file", train, "--validation_file", dev)) == 2
    error = error_paragraph(capsys.readouterr().err)
    assert f"The {split} file {train if split == 'train' else dev} " in error, error
    if row is not None:
        assert f" row {row} (" in error, error
    assert all(phrase in error for phrase in phrases), error
    assert not (tmp_path / "new").exists()  # nothing written, not even the folders the Trainer creates


def test_rows_are_counted_and_the_others_listed(tiny_model_dir, tmp_path, capsys):
    rows = labelled(12)
    for index in (1, 4, 5, 6, 7, 8, 9, 10):
        rows = replaced(rows, index, ("", rows[index][1]))
    train, dev = csv_files(tmp_path, train=rows)
    assert run(common(tiny_model_dir, tmp_path / "out", "--train_file", train, "--validation_file", dev)) == 2
    error = error_paragraph(capsys.readouterr().err)
    assert "row 2 (data rows counted from 1, the header not counted; also rows 5, 6, 7, 8, 9 and 2 more)" in error


def test_a_null_text_in_the_test_file_is_refused(tiny_model_dir, tmp_path, capsys):
    train, dev = json_files(tmp_path)
    write_json(tmp_path / "test.json", [{"sentence": "a movie"}, {"sentence": "the plot"}, {"sentence": None}])
    args = common(tiny_model_dir, tmp_path / "out", "--train_file", train, "--validation_file", dev)
    assert run([*args, "--test_file", tmp_path / "test.json", "--do_predict"]) == 2
    error = error_paragraph(capsys.readouterr().err)
    assert f"The test file {tmp_path / 'test.json'} has no text" in error and "row 3 (records" in error


def test_a_test_file_without_labels_loads(tiny_model_dir, tmp_path):
    train, dev = json_files(tmp_path, train=records(labelled(16)))
    write_json(tmp_path / "test.json", [{"sentence": text} for text, _ in labelled(5, seed=2)])
    out = tmp_path / "out"
    args = common(tiny_model_dir, out, "--train_file", train, "--validation_file", dev, "--max_steps", "2")
    assert run([*args, "--method", "lora", "--test_file", tmp_path / "test.json", "--do_predict"]) == 0
    with open(out / "predict_results_custom.txt") as f:
        lines = f.read().splitlines()
    assert len(lines) == 6 and {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}
