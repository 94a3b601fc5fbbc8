"""GLUE from local TSVs: tiny files in each task's original layout, written here, read into the Hub's splits,
columns and labels."""

import logging

import pytest
from datasets import ClassLabel, Value
from glue_tsv_samples import LAYOUTS, write_files

from fw_trainer.glue.tsv_layout import GLUE_LABEL_NAMES, TASK_TO_KEYS, glue_dir_from_env, load_glue_dir


def test_layouts_cover_every_task():
    assert sorted(LAYOUTS) == sorted(TASK_TO_KEYS) == sorted(GLUE_LABEL_NAMES)


@pytest.mark.parametrize("task", sorted(LAYOUTS))
def test_tiny_files_in_each_layout(tmp_path, task):
    folder, files, expected = LAYOUTS[task]
    data = load_glue_dir(write_files(tmp_path, folder, files), task)

    assert list(data) == list(expected)  # the Hub's split names, in the Hub's order; test splits only when present
    text_keys = [key for key in TASK_TO_KEYS[task] if key is not None]
    names = GLUE_LABEL_NAMES[task]
    for split, rows in expected.items():
        dataset = data[split]
        assert dataset.split == split
        assert dataset.column_names == text_keys + ["label", "idx"]
        assert dataset.features["idx"] == Value("int32")
        if names is None:
            assert dataset.features["label"] == Value("float32")
        else:
            assert dataset.features["label"] == ClassLabel(names=names)
        assert [tuple(row.values()) for row in dataset] == rows


def test_glue_label_names_are_the_hubs():
    # As listed in the `nyu-mll/glue` dataset card (and the builder that made it): WNLI is the one task whose
    # `entailment` is id 1, and MNLI's order is entailment, neutral, contradiction.
    assert GLUE_LABEL_NAMES == {
        "cola": ["unacceptable", "acceptable"],
        "mnli": ["entailment", "neutral", "contradiction"],
        "mrpc": ["not_equivalent", "equivalent"],
        "qnli": ["entailment", "not_entailment"],
        "qqp": ["not_duplicate", "duplicate"],
        "rte": ["entailment", "not_entailment"],
        "sst2": ["negative", "positive"],
        "stsb": None,
        "wnli": ["not_entailment", "entailment"],
    }


def test_malformed_rows_are_skipped_with_one_warning(tmp_path, caplog):
    folder, files, _ = LAYOUTS["qqp"]
    files = dict(
        files, **{"train.tsv": files["train.tsv"] + ["1\t2\t3\tonly three fields then?", "4\t5\t6\tA?\tB?\t"]}
    )
    with caplog.at_level(logging.WARNING, logger="fw_trainer.glue.tsv_layout"):
        data = load_glue_dir(write_files(tmp_path, folder, files), "qqp")
    assert data["train"]["idx"] == [0, 2]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Skipped 3 of 5 rows" in warnings[0] and "train.tsv" in warnings[0]


def test_blank_lines_and_a_missing_final_newline(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\na\t0\n\nb\t1", encoding="utf-8")
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nc\t1\n\n", encoding="utf-8")
    data = load_glue_dir(tmp_path, "sst2")
    assert data["train"]["sentence"] == ["a", "b"] and data["train"]["idx"] == [0, 1]
    assert data["validation"]["sentence"] == ["c"]


def test_labels_given_as_ids_or_names(tmp_path):
    # QNLI/RTE/MNLI files spell labels out, WNLI/SST-2 give ids; either is accepted for any task.
    header = "index\tsentence1\tsentence2\tlabel"
    files = {"train.tsv": [header, "0\ta\tb\t1", "1\tc\td\tentailment"], "dev.tsv": [header, "0\te\tf\t0"]}
    data = load_glue_dir(write_files(tmp_path, "RTE", files), "rte")
    assert data["train"]["label"] == [1, 0]
    assert data["train"].features["label"].int2str(data["train"]["label"]) == ["not_entailment", "entailment"]


def test_glue_dir_from_env(monkeypatch):
    monkeypatch.setenv("GLUE_DIR", "/data/glue")
    assert glue_dir_from_env() == "/data/glue"
    monkeypatch.setenv("GLUE_DIR", "")
    assert glue_dir_from_env() is None
    monkeypatch.delenv("GLUE_DIR")
    assert glue_dir_from_env() is None
