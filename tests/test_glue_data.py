"""
GLUE from local TSVs: tiny files in each task's original layout, written here, and the real GLUE files (SST-2, CoLA,
RTE) when `$GLUE_DIR` or `../shared/glue` holds them.
"""

import logging
import os
from pathlib import Path

import pytest
from datasets import ClassLabel, Value

from fw_trainer.glue.data import GLUE_LABEL_NAMES, TASK_TO_KEYS, glue_dir_from_env, load_glue_dir


def write_files(root: Path, folder: str, files: dict[str, list[str]]) -> Path:
    """Writes each file's lines, tab-separated as given, to `root/folder/`; returns the GLUE root."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (root / folder / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return root


# Headers as in the GLUE download: checked against the real SST-2, CoLA and RTE files; the others as the Hub's builder
# and transformers' former GLUE processors read them (column names, label column, MRPC's byte-order mark).
MNLI_TRAIN_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER.replace("label1\tgold_label", "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")
MNLI_TEST_HEADER = MNLI_TRAIN_HEADER.replace("\tlabel1\tgold_label", "")
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"


def mnli_row(index: int, premise: str, hypothesis: str, labels: list[str]) -> str:
    """A row of MNLI's layout: ids, genre, four parse trees, the two sentences, then label1... and gold_label."""
    parses = ["( ( x ) )", "( y )", "(ROOT x)", "(ROOT y)"]
    return "\t".join([str(index), "31193", f"{index}n", "fiction", *parses, premise, hypothesis, *labels])


# task → (folder, files, expected splits: split → rows of (text values..., label, idx)).
LAYOUTS = {
    "cola": (
        "CoLA",
        {
            "train.tsv": [
                "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.",
                'l-93\t0\t*\tSusan whispered "Shut up.',  # unbalanced quote: must not swallow the next line
                "gj04\t1\t\tThe mechanical doll wriggled itself loose.",
            ],
            "dev.tsv": ["gj04\t0\t*\tThe more you eat, the most you want."],
            "test.tsv": ["index\tsentence", "0\tBill whistled past the house."],
        },
        {
            "train": [
                ("The sailors rode the breeze clear of the rocks.", 1, 0),
                ('Susan whispered "Shut up.', 0, 1),
                ("The mechanical doll wriggled itself loose.", 1, 2),
            ],
            "validation": [("The more you eat, the most you want.", 0, 0)],
            "test": [("Bill whistled past the house.", -1, 0)],
        },
    ),
    "sst2": (
        "SST-2",
        {
            "train.tsv": ["sentence\tlabel", "hide new secretions from the parental units \t0", '" funny \t1'],
            "dev.tsv": ["sentence\tlabel", "it 's a charming and often affecting journey . \t1"],
            "test.tsv": ["index\tsentence", "0\tuneasy mishmash of styles and genres ."],
        },
        {
            "train": [("hide new secretions from the parental units ", 0, 0), ('" funny ', 1, 1)],
            "validation": [("it 's a charming and often affecting journey . ", 1, 0)],
            "test": [("uneasy mishmash of styles and genres .", -1, 0)],
        },
    ),
    "mrpc": (
        "MRPC",
        {
            # The download script copies MSR's header, byte-order mark included, into train.tsv and dev.tsv.
            "train.tsv": ["\ufeff" + MRPC_HEADER, '1\t702876\t702977\tHe said "yes".\t"Yes," he said.'],
            "dev.tsv": ["\ufeff" + MRPC_HEADER, "0\t1355540\t1355592\tA b c.\tD e f."],
            "test.tsv": ["index\t#1 ID\t#2 ID\t#1 String\t#2 String", "0\t1089874\t1089925\tG h.\tI j."],
        },
        {
            "train": [('He said "yes".', '"Yes," he said.', 1, 0)],
            "validation": [("A b c.", "D e f.", 0, 0)],
            "test": [("G h.", "I j.", -1, 0)],
        },
    ),
    "qqp": (
        "QQP",
        {
            "train.tsv": [
                "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                "133273\t213221\t213222\tHow is the life of a math student?\tWhich level of prepration is enough?\t0",
                "402555\t536040\t536041\tHow do I learn to cook?",  # malformed: 4 of 6 fields
                "360472\t364011\t490273\tWhat causes stool color to change?\tWhat can cause stool to come out?\t1",
            ],
            "dev.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "1\t2\t3\tQ one?\tQ two?\t1"],
            "test.tsv": ["id\tquestion1\tquestion2", "0\tWhy?\tWhy not?"],
        },
        {
            # The skipped row keeps its number: `idx` is the position in the file, as the Hub's builder counts.
            "train": [
                ("How is the life of a math student?", "Which level of prepration is enough?", 0, 0),
                ("What causes stool color to change?", "What can cause stool to come out?", 1, 2),
            ],
            "validation": [("Q one?", "Q two?", 1, 0)],
            "test": [("Why?", "Why not?", -1, 0)],
        },
    ),
    "stsb": (
        "STS-B",
        {
            "train.tsv": [
                STSB_HEADER,
                "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane.\tAn air plane.\t5.000",
            ],
            "dev.tsv": [STSB_HEADER, "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man.\tA dog.\t0.8"],
            "test.tsv": [STSB_HEADER.replace("\tscore", ""), "0\tmain-news\theadlines\t2016\t0\tnone\tnone\tX.\tY."],
        },
        {
            "train": [("A plane.", "An air plane.", 5.0, 0)],
            "validation": [("A man.", "A dog.", pytest.approx(0.8), 0)],
            "test": [("X.", "Y.", -1.0, 0)],
        },
    ),
    "mnli": (
        "MNLI",
        {
            "train.tsv": [
                MNLI_TRAIN_HEADER,
                mnli_row(
                    0,
                    "Conceptually cream skimming has two basic dimensions.",
                    "Product and geography.",
                    ["neutral"] * 2,
                ),
                mnli_row(1, 'He said "no".', "He agreed.", ["contradiction"] * 2),
            ],
            "dev_matched.tsv": [
                MNLI_DEV_HEADER,
                mnli_row(0, "The new rights are nice.", "Everyone likes them.", ["neutral"] * 6),
            ],
            "dev_mismatched.tsv": [MNLI_DEV_HEADER, mnli_row(0, "Your gift helps.", "It helps.", ["entailment"] * 6)],
            "test_matched.tsv": [MNLI_TEST_HEADER, mnli_row(0, "Hierbas, ans seco.", "Hierbas is a name.", [])],
            "test_mismatched.tsv": [MNLI_TEST_HEADER, mnli_row(0, "What a day.", "A day.", [])],
        },
        {
            "train": [
                ("Conceptually cream skimming has two basic dimensions.", "Product and geography.", 1, 0),
                ('He said "no".', "He agreed.", 2, 1),
            ],
            "validation_matched": [("The new rights are nice.", "Everyone likes them.", 1, 0)],
            "validation_mismatched": [("Your gift helps.", "It helps.", 0, 0)],
            "test_matched": [("Hierbas, ans seco.", "Hierbas is a name.", -1, 0)],
            "test_mismatched": [("What a day.", "A day.", -1, 0)],
        },
    ),
    "qnli": (
        "QNLI",
        {
            "train.tsv": [
                "index\tquestion\tsentence\tlabel",
                "0\tWhen did the third Digimon series begin?\tUnlike the two seasons before it.\tnot_entailment",
                "1\tWhich missile batteries?\tThe Soviets deployed SA-2 batteries.\tentailment",
            ],
            "dev.tsv": ["index\tquestion\tsentence\tlabel", "0\tWhat?\tThat.\tentailment"],
        },
        {
            "train": [
                ("When did the third Digimon series begin?", "Unlike the two seasons before it.", 1, 0),
                ("Which missile batteries?", "The Soviets deployed SA-2 batteries.", 0, 1),
            ],
            "validation": [("What?", "That.", 0, 0)],
        },
    ),
    "rte": (
        "RTE",
        {
            "train.tsv": [
                "index\tsentence1\tsentence2\tlabel",
                '0\t"I will not seek your votes," he said.\tHe will run.\tnot_entailment',
                "1\tA place of sorrow.\tA place.\tentailment",
            ],
            "dev.tsv": [
                "index\tsentence1\tsentence2\tlabel",
                "0\tDana Reeve died.\tReeve had an accident.\tnot_entailment",
            ],
            "test.tsv": ["index\tsentence1\tsentence2", "0\tMaude and Dora.\tThey saw a train."],
        },
        {
            "train": [
                ('"I will not seek your votes," he said.', "He will run.", 1, 0),
                ("A place of sorrow.", "A place.", 0, 1),
            ],
            "validation": [("Dana Reeve died.", "Reeve had an accident.", 1, 0)],
            "test": [("Maude and Dora.", "They saw a train.", -1, 0)],
        },
    ),
    "wnli": (
        "WNLI",
        {
            "train.tsv": [
                "index\tsentence1\tsentence2\tlabel",
                "0\tI stuck a pin through a carrot.\tThe carrot had a hole.\t1",
                "1\tJohn couldn't see the stage.\tJohn is so tall.\t0",
            ],
            "dev.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tThe drain is clogged.\tThe hair is clogged.\t0"],
        },
        {
            "train": [
                ("I stuck a pin through a carrot.", "The carrot had a hole.", 1, 0),
                ("John couldn't see the stage.", "John is so tall.", 0, 1),
            ],
            "validation": [("The drain is clogged.", "The hair is clogged.", 0, 0)],
        },
    ),
}


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
    with caplog.at_level(logging.WARNING, logger="fw_trainer.glue.data"):
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


# Bad inputs.


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


def test_glue_dir_from_env(monkeypatch):
    monkeypatch.setenv("GLUE_DIR", "/data/glue")
    assert glue_dir_from_env() == "/data/glue"
    monkeypatch.setenv("GLUE_DIR", "")
    assert glue_dir_from_env() is None
    monkeypatch.delenv("GLUE_DIR")
    assert glue_dir_from_env() is None


# The real GLUE files.


def real_glue_dir() -> Path:
    """`$GLUE_DIR`, else `shared/glue` next to the repository root (where CI keeps the data)."""
    env = os.environ.get("GLUE_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "glue"


def raw_rows(path: Path, skip_header: bool) -> list[list[str]]:
    """An independent reading of a TSV: every line split on tabs, nothing else (no csv module, no quote rules)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    lines = [line for line in lines[1 if skip_header else 0 :] if line]
    return [line.split("\t") for line in lines]


@pytest.fixture(scope="module", params=["sst2", "cola", "rte"])
def real(request):
    task = request.param
    folder = {"sst2": "SST-2", "cola": "CoLA", "rte": "RTE"}[task]
    if not all((real_glue_dir() / folder / name).is_file() for name in ("train.tsv", "dev.tsv")):
        pytest.skip(f"No GLUE {folder} data at {real_glue_dir() / folder}: set GLUE_DIR to the GLUE root.")
    return task, real_glue_dir() / folder, load_glue_dir(real_glue_dir(), task)


# task → split → (rows, label counts in id order): GLUE's published split sizes (the Hub's too).
REAL_COUNTS = {
    "sst2": {"train": (67_349, [29_780, 37_569]), "validation": (872, [428, 444])},
    "cola": {"train": (8_551, [2_528, 6_023]), "validation": (1_043, [322, 721])},
    "rte": {"train": (2_490, [1_249, 1_241]), "validation": (277, [146, 131])},
}


def test_real_sizes_features_and_label_counts(real):
    task, _, data = real
    assert list(data) == ["train", "validation"]
    for split, (num_rows, label_counts) in REAL_COUNTS[task].items():
        dataset = data[split]
        assert dataset.num_rows == num_rows
        assert dataset.features["label"].names == GLUE_LABEL_NAMES[task]
        labels = list(dataset["label"])
        assert [labels.count(label) for label in range(len(label_counts))] == label_counts
        assert dataset["idx"] == list(range(num_rows))


def test_real_text_matches_a_plain_tab_split(real):
    # Every sentence, quotes and trailing spaces included, exactly as a plain split of the line gives it.
    task, folder, data = real
    for split, file_name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        rows = raw_rows(folder / file_name, skip_header=task != "cola")
        if task == "cola":
            assert data[split]["sentence"] == [row[3] for row in rows]
        elif task == "sst2":
            assert data[split]["sentence"] == [row[0] for row in rows]
        else:
            assert data[split]["sentence1"] == [row[1] for row in rows]
            assert data[split]["sentence2"] == [row[2] for row in rows]


def test_real_sentences_with_double_quotes(real):
    task, _, data = real
    if task == "cola":
        assert 'Susan whispered "Shut up".' in data["train"]["sentence"]
    elif task == "rte":
        # About 70 premises start with a quote: a CSV reader with quote handling would merge or mangle them.
        starts_with_quote = [text for text in data["train"]["sentence1"] if text.startswith('"')]
        assert len(starts_with_quote) > 50
        assert any(
            text.startswith('"I will not seek your votes for a new mandate." With') for text in starts_with_quote
        )
    else:
        # SST-2 is tokenized: its quotes are `` and '', never a double-quote character; its sentences end in a space.
        assert not any('"' in text for text in data["train"]["sentence"])
        assert data["validation"][0] == {
            "sentence": "it 's a charming and often affecting journey . ",
            "label": 1,
            "idx": 0,
        }
