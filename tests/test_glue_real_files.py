"""GLUE from local TSVs: the real GLUE files (SST-2, CoLA, RTE) when `$GLUE_DIR` or `../shared/glue` holds them,
against GLUE's published sizes and an independent reading of the lines."""

import os
from pathlib import Path

import pytest

from fw_trainer.glue.tsv_layout import GLUE_LABEL_NAMES, load_glue_dir


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
