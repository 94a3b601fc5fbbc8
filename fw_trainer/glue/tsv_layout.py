"""
GLUE from a local folder in the original TSV layout, as the same `DatasetDict` that
`load_dataset("nyu-mll/glue", task)` returns: for machines without access to the Hugging Face Hub.
"""

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from datasets import ClassLabel, Dataset, DatasetDict, Features, Split, Value


logger = logging.getLogger(__name__)

# Text columns per task, as in transformers' examples/pytorch/text-classification/run_glue.py (`task_to_keys`).
TASK_TO_KEYS: dict[str, tuple[str, Optional[str]]] = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}

# The `ClassLabel` names of the Hub dataset `nyu-mll/glue`, in id order; `None`: regression (a float32 score).
GLUE_LABEL_NAMES: dict[str, Optional[list[str]]] = {
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

# The task folders of the GLUE root, as the official download (download_glue_data.py) names them.
TASK_TO_FOLDER: dict[str, str] = {
    "cola": "CoLA",
    "mnli": "MNLI",
    "mrpc": "MRPC",
    "qnli": "QNLI",
    "qqp": "QQP",
    "rte": "RTE",
    "sst2": "SST-2",
    "stsb": "STS-B",
    "wnli": "WNLI",
}

# CoLA's train.tsv and dev.tsv are the only GLUE files without a header: source, label, original annotation, sentence.
_COLA_NUM_FIELDS = 4
_COLA_LABEL_FIELD = 1
_COLA_SENTENCE_FIELD = 3


@dataclass(frozen=True)
class _FileLayout:
    """Where a task's values sit in its headed TSV files: a column name per text key, and the label's column."""

    text_columns: tuple[str, ...]
    label_column: str


_LAYOUTS: dict[str, _FileLayout] = {
    "cola": _FileLayout(("sentence",), "label"),  # test.tsv only (`index<TAB>sentence`); train/dev have no header
    "mnli": _FileLayout(("sentence1", "sentence2"), "gold_label"),
    "mrpc": _FileLayout(("#1 String", "#2 String"), "Quality"),
    "qnli": _FileLayout(("question", "sentence"), "label"),
    "qqp": _FileLayout(("question1", "question2"), "is_duplicate"),
    "rte": _FileLayout(("sentence1", "sentence2"), "label"),
    "sst2": _FileLayout(("sentence",), "label"),
    "stsb": _FileLayout(("sentence1", "sentence2"), "score"),
    "wnli": _FileLayout(("sentence1", "sentence2"), "label"),
}


def glue_dir_from_env() -> Optional[str]:
    """The GLUE root named by the environment variable `GLUE_DIR`, or `None` when it is unset or empty."""
    return os.environ.get("GLUE_DIR") or None


def glue_features(task_name: str) -> Features:
    """
    The features of a GLUE task on the Hub: its text columns (strings), `label` and `idx` (int32), in that order.

    Args:
        task_name (`str`): One of the keys of `TASK_TO_KEYS`.

    Returns:
        `datasets.Features`: `label` is a `ClassLabel` with the Hub's names, or `Value("float32")` for stsb.
    """
    _check_task(task_name)
    features = {key: Value("string") for key in TASK_TO_KEYS[task_name] if key is not None}
    names = GLUE_LABEL_NAMES[task_name]
    features["label"] = ClassLabel(names=names) if names is not None else Value("float32")
    features["idx"] = Value("int32")
    return Features(features)


def glue_split_files(task_name: str) -> dict[str, tuple[str, bool]]:
    """
    The Hub's split names of a task, in the Hub's order, each with its file name in the task folder and whether the
    file must exist (train and dev do; the unlabelled test files are optional).
    """
    _check_task(task_name)
    if task_name == "mnli":
        return {
            "train": ("train.tsv", True),
            "validation_matched": ("dev_matched.tsv", True),
            "validation_mismatched": ("dev_mismatched.tsv", True),
            "test_matched": ("test_matched.tsv", False),
            "test_mismatched": ("test_mismatched.tsv", False),
        }
    return {"train": ("train.tsv", True), "validation": ("dev.tsv", True), "test": ("test.tsv", False)}


def load_glue_dir(glue_dir: Union[str, os.PathLike], task_name: str) -> DatasetDict:
    """
    Reads one task of the GLUE data in its original TSV layout into the `DatasetDict` of the Hub's `nyu-mll/glue`.

    The folder is the one the official download script creates: `glue_dir/SST-2/train.tsv`, `glue_dir/SST-2/dev.tsv`,
    ... (folders CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE, WNLI; MNLI has `dev_matched.tsv` and
    `dev_mismatched.tsv`). The result has the Hub's splits (`train`, `validation` or MNLI's `validation_matched` and
    `validation_mismatched`, and the test splits when their files exist), columns (`TASK_TO_KEYS[task_name]`, `label`,
    `idx`) and features (`label` a `ClassLabel` with the Hub's names, stsb's a float32 score; test rows have label -1
    as on the Hub). String labels (MNLI, QNLI, RTE) are mapped to the Hub's ids.

    `idx` is the row's position among the data rows of its file, as in the builder that made the Hub's copy: a
    malformed row that is skipped leaves a gap. MRPC is the exception: the Hub numbers its train and validation rows
    by their position in MSR's original training file, which GLUE's train.tsv/dev.tsv no longer carry, so there `idx`
    is the position in train.tsv or dev.tsv.

    The files are read with tab as delimiter and no quote handling (`csv.QUOTE_NONE`): the GLUE TSVs are not
    CSV-quoted, and a sentence that starts with `"` would otherwise lose its quotes or swallow the following lines.

    Args:
        glue_dir (`str` or `os.PathLike`): The GLUE root, the folder that holds the task folders.
        task_name (`str`): One of `cola`, `mnli`, `mrpc`, `qnli`, `qqp`, `rte`, `sst2`, `stsb`, `wnli`.

    Returns:
        `datasets.DatasetDict`: The task's splits, in the Hub's order.

    Raises:
        `ValueError`: If the task is unknown, a file's header (or CoLA's field count) does not match the task's layout,
            a label is not one of the task's, or no row of a file could be read.
        `FileNotFoundError`: If the GLUE root, the task folder, or its train or dev file is missing.
    """
    _check_task(task_name)
    root = Path(glue_dir)
    hint = (
        "GLUE_DIR (or --glue_dir) should point at the GLUE root in its original TSV layout, the folder that holds "
        "e.g. SST-2/train.tsv and SST-2/dev.tsv."
    )
    if not root.is_dir():
        raise FileNotFoundError(f"The GLUE directory {str(root)!r} does not exist or is not a directory. {hint}")
    task_dir = root / TASK_TO_FOLDER[task_name]
    if not task_dir.is_dir():
        present = sorted(folder for folder in TASK_TO_FOLDER.values() if (root / folder).is_dir())
        if (root / "train.tsv").is_file():
            where = f"{str(root)!r} holds a train.tsv itself: it looks like a task folder, so pass its parent instead."
        else:
            where = f"Task folders found there: {', '.join(present) if present else 'none'}."
        raise FileNotFoundError(
            f"The GLUE directory has no folder for {task_name}: expected {str(task_dir)!r}. {where} {hint}"
        )

    features = glue_features(task_name)
    splits = {}
    for split, (file_name, required) in glue_split_files(task_name).items():
        path = task_dir / file_name
        if not path.is_file():
            if required:
                raise FileNotFoundError(
                    f"The GLUE {task_name} data is incomplete: expected the file {str(path)!r} (split {split!r}). "
                    f"{hint}"
                )
            continue
        columns = _read_split_file(path, task_name, labelled=not split.startswith("test"))
        splits[split] = Dataset.from_dict(columns, features=features, split=Split(split))
    return DatasetDict(splits)


def _check_task(task_name: str) -> None:
    if task_name in TASK_TO_KEYS:
        return
    # A folder name (SST-2) or another spelling (SST2) is the likeliest mistake: name the key it stands for.
    normalized = str(task_name).lower().replace("-", "")
    guess = next(
        (task for task, folder in TASK_TO_FOLDER.items() if folder.lower().replace("-", "") == normalized), None
    )
    suggestion = f" Did you mean {guess!r}?" if guess else ""
    raise ValueError(
        f"Unknown GLUE task {task_name!r}. The task name must be one of {', '.join(TASK_TO_KEYS)} (lower case, as on "
        f"the Hub and in run_glue.py).{suggestion}"
    )


def _read_split_file(path: Path, task_name: str, labelled: bool) -> dict[str, list]:
    """
    The columns (text keys, `label`, `idx`) of one TSV file. Rows with the wrong number of fields or an empty label
    are skipped (one warning with the count); a wrong header, an unknown label or a file of nothing but such rows
    raise a `ValueError`.
    """
    text_keys = [key for key in TASK_TO_KEYS[task_name] if key is not None]
    names = GLUE_LABEL_NAMES[task_name]
    columns: dict[str, list] = {key: [] for key in text_keys + ["label", "idx"]}
    # utf-8-sig: MRPC's train.tsv and dev.tsv start with a byte-order mark (copied from MSR's file by the download
    # script) that would otherwise become part of the first column name, `\ufeffQuality`.
    with open(path, newline="", encoding="utf-8-sig") as f:
        # csv.reader yields a blank line (a trailing one, say) as an empty row: drop those rather than count them as
        # malformed, as the Hub's builder (a DictReader) does.
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = (row for row in reader if row)
        headless = task_name == "cola" and labelled
        if headless:
            num_fields = _COLA_NUM_FIELDS
            text_fields, label_field = [_COLA_SENTENCE_FIELD], _COLA_LABEL_FIELD
        else:
            header = next(rows, None)
            if header is None:
                raise ValueError(f"The GLUE {task_name} file {str(path)!r} is empty. Re-download or re-extract it.")
            text_fields, label_field = _locate_columns(path, task_name, header, labelled)
            num_fields = len(header)

        skipped = 0
        for position, row in enumerate(rows):
            if headless and position == 0 and len(row) != num_fields:
                raise ValueError(
                    f"The GLUE CoLA file {str(path)!r} does not have CoLA's train/dev layout: its first row has "
                    f"{len(row)} tab-separated field(s), expected {num_fields} and no header (source, label, original "
                    "annotation, sentence). Point GLUE_DIR at the original GLUE data (CoLA/train.tsv, CoLA/dev.tsv)."
                )
            raw_label = row[label_field] if label_field is not None and len(row) == num_fields else None
            if len(row) != num_fields or raw_label == "":
                skipped += 1
                continue
            for key, field in zip(text_keys, text_fields):
                columns[key].append(row[field])
            if raw_label is None:
                label = -1 if names is not None else -1.0  # the Hub's "no label" of test rows
            else:
                label = _parse_label(raw_label, names, task_name, path, reader.line_num)
            columns["label"].append(label)
            columns["idx"].append(position)

    if skipped:
        total = skipped + len(columns["idx"])
        if not columns["idx"]:
            raise ValueError(
                f"None of the {total} rows of the GLUE {task_name} file {str(path)!r} has the {num_fields} "
                "tab-separated fields of its header (or CoLA's 4) and a label: it is not a GLUE TSV of this task. "
                "Re-download the GLUE data or point GLUE_DIR at the right folder."
            )
        logger.warning(
            "Skipped %d of %d rows of %s that do not have the %d tab-separated fields of its layout or have an empty "
            "label (malformed rows, which the Hub's builder and transformers' GLUE processors drop too).",
            skipped,
            total,
            path,
            num_fields,
        )
    return columns


def _locate_columns(path: Path, task_name: str, header: list[str], labelled: bool) -> tuple[list[int], Optional[int]]:
    """Positions of the text columns and of the label column (`None`: an unlabelled test file) in a header."""
    layout = _LAYOUTS[task_name]
    required = list(layout.text_columns) + ([layout.label_column] if labelled else [])
    missing = [column for column in required if column not in header]
    if missing:
        raise ValueError(
            f"The header of the GLUE {task_name} file {str(path)!r} does not match the task's layout: it lacks the "
            f"column(s) {', '.join(map(repr, missing))}. Expected columns including {', '.join(map(repr, required))}; "
            f"found {', '.join(map(repr, header))}. Check that GLUE_DIR points at the original GLUE data and that the "
            "file belongs to this task."
        )
    label_field = header.index(layout.label_column) if layout.label_column in header else None
    return [header.index(column) for column in layout.text_columns], label_field


def _parse_label(raw: str, names: Optional[list[str]], task_name: str, path: Path, line: int) -> Union[int, float]:
    """A label id from a name or a digit string (ClassLabel tasks), or a float score (stsb)."""
    if names is None:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(
                f"Line {line} of the GLUE {task_name} file {str(path)!r} has the score {raw!r}, which is not a "
                "number. STS-B scores are floats from 0 to 5; check that the file is the original STS-B TSV."
            ) from None
    if raw in names:
        return names.index(raw)
    if raw.isascii() and raw.isdigit() and int(raw) < len(names):
        return int(raw)
    raise ValueError(
        f"Line {line} of the GLUE {task_name} file {str(path)!r} has the unknown label {raw!r}. {task_name} labels "
        f"are {', '.join(map(repr, names))} or their ids 0 to {len(names) - 1}; check that the file belongs to this "
        "task."
    )
