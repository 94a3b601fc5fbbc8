"""GLUE from local TSVs, bad inputs: a wrong task, root, folder or file, a header or label of another task, and
files with nothing to read each end in one error that says what is wrong and where."""

import pytest
from glue_tsv_samples import LAYOUTS, STSB_HEADER, mnli_row, write_files

from fw_trainer.glue.tsv_layout import load_glue_dir


def test_unknown_task_lists_the_nine(tmp_path):
    with pytest.raises(ValueError, match="Unknown GLUE task 'SST-2'") as error:
        load_glue_dir(tmp_path, "SST-2")
    message = str(error.value)
    assert "Did you mean 'sst2'?" in message
    assert all(task in message for task in ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli"))
    with pytest.raises(ValueError, match="Unknown GLUE task 'ax'"):
        load_glue_dir(tmp_path, "ax")


def test_missing_glue_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        load_glue_dir(missing, "sst2")
    assert str(missing) in str(error.value) and "SST-2/train.tsv" in str(error.value)


def test_missing_task_folder_names_the_expected_path_and_the_present_ones(tmp_path):
    write_files(tmp_path, "RTE", LAYOUTS["rte"][1])
    with pytest.raises(FileNotFoundError, match="no folder for cola") as error:
        load_glue_dir(tmp_path, "cola")
    assert str(tmp_path / "CoLA") in str(error.value) and "found there: RTE" in str(error.value)


def test_a_task_folder_given_as_the_root(tmp_path):
    write_files(tmp_path, "SST-2", LAYOUTS["sst2"][1])
    with pytest.raises(FileNotFoundError, match="pass its parent"):
        load_glue_dir(tmp_path / "SST-2", "sst2")


@pytest.mark.parametrize("task, missing", [("sst2", "dev.tsv"), ("mnli", "dev_mismatched.tsv"), ("rte", "train.tsv")])
def test_missing_train_or_dev_file(tmp_path, task, missing):
    folder, files, _ = LAYOUTS[task]
    write_files(tmp_path, folder, {name: lines for name, lines in files.items() if name != missing})
    with pytest.raises(FileNotFoundError, match="expected the file") as error:
        load_glue_dir(tmp_path, task)
    assert str(tmp_path / folder / missing) in str(error.value)


def test_header_of_another_task(tmp_path):
    # RTE's files in the SST-2 folder.
    write_files(tmp_path, "SST-2", LAYOUTS["rte"][1])
    with pytest.raises(ValueError, match="does not match the task's layout: it lacks the column\\(s\\) 'sentence'"):
        load_glue_dir(tmp_path, "sst2")


def test_labelled_file_without_its_label_column(tmp_path):
    header = "index\tsentence1\tsentence2"
    write_files(tmp_path, "RTE", {"train.tsv": [header, "0\ta\tb"], "dev.tsv": [header, "0\tc\td"]})
    with pytest.raises(ValueError, match="lacks the column\\(s\\) 'label'"):
        load_glue_dir(tmp_path, "rte")


def test_cola_with_a_header_or_the_wrong_field_count(tmp_path):
    write_files(tmp_path, "CoLA", {"train.tsv": ["sentence\tlabel", "a\t1"], "dev.tsv": ["s\t1\t\tb"]})
    with pytest.raises(ValueError, match="first row has 2 tab-separated field\\(s\\), expected 4 and no header"):
        load_glue_dir(tmp_path, "cola")


@pytest.mark.parametrize(
    "task, row, bad",
    [("rte", "1\ta\tb\tneutral", "'neutral'"), ("sst2", "b\t2", "'2'"), ("mnli", None, "'-'")],
)
def test_unknown_label(tmp_path, task, row, bad):
    folder, files, _ = LAYOUTS[task]
    if task == "mnli":
        row = mnli_row(9, "p", "h", ["-", "-"])
    files = dict(files, **{"train.tsv": files["train.tsv"] + [row]})
    with pytest.raises(ValueError, match=f"has the unknown label {bad}") as error:
        load_glue_dir(write_files(tmp_path, folder, files), task)
    assert f"Line {len(files['train.tsv'])} of" in str(error.value)


def test_stsb_score_that_is_not_a_number(tmp_path):
    folder, files, _ = LAYOUTS["stsb"]
    files = dict(files, **{"dev.tsv": [STSB_HEADER, "0\tg\tf\ty\t0\tn\tn\tA.\tB.\thigh"]})
    with pytest.raises(ValueError, match="has the score 'high', which is not a number"):
        load_glue_dir(write_files(tmp_path, folder, files), "stsb")


def test_a_file_of_only_malformed_rows(tmp_path):
    write_files(tmp_path, "SST-2", {"train.tsv": ["sentence\tlabel", "a,0", "b,1"], "dev.tsv": ["sentence\tlabel"]})
    with pytest.raises(ValueError, match="None of the 2 rows"):
        load_glue_dir(tmp_path, "sst2")


def test_an_empty_file(tmp_path):
    write_files(tmp_path, "SST-2", {"train.tsv": [], "dev.tsv": ["sentence\tlabel"]})
    with pytest.raises(ValueError, match="is empty"):
        load_glue_dir(tmp_path, "sst2")
