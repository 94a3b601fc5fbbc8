"""The rows of your own csv/json files that the GLUE script cannot train or evaluate on, refused before the model is
built: a missing or empty text, a missing label, a label that is not a finite number, float labels that are all whole
numbers (a regression that was meant to be a classification), a text column that holds no text. Each is one
[`UsageError`] that names the file, the column and the row."""

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict

from ..errors import UsageError


# The rows a message lists after the first.
_LISTED_ROWS = 5
# The label values a message lists.
_LISTED_VALUES = 5
# What a csv reader (pandas) reads as a missing value, besides an empty field.
_CSV_MISSING = "an empty field, or a value pandas reads as missing (NA, N/A, null, NaN, ...)"


def check_examples(
    raw_datasets: DatasetDict, data_files: dict[str, str], builder: str, text_columns: tuple[str, Optional[str]]
) -> None:
    """
    Checks each example of your own files: every split's text columns hold text in every row, the train and validation
    files have a label in every row (the test file may be unlabelled), and float labels are finite and, in the train
    file, not all whole numbers.

    Args:
        raw_datasets (`DatasetDict`): The splits as read from the files, with the same columns (the test split may lack
            `label`).
        data_files (`dict[str, str]`): The file of each split.
        builder (`str`): `"csv"` or `"json"`: how the files were read, which decides how rows are counted.
        text_columns (`tuple[str, Optional[str]]`): The columns the script tokenizes ([`sentence_keys`]).

    Raises:
        `UsageError`: Naming the file, the column and the first bad row (and how many more there are), and what to do.
    """
    for split, dataset in raw_datasets.items():
        for column in filter(None, text_columns):
            _check_text(dataset, column, split, data_files[split], builder, text_columns)
    for split in ("train", "validation"):
        if split in raw_datasets:
            _check_labels(raw_datasets[split], split, data_files[split], builder)
    _check_whole_number_floats(raw_datasets["train"], data_files["train"])


def _check_text(
    dataset: Dataset, column: str, split: str, path: str, builder: str, text_columns: tuple[str, Optional[str]]
) -> None:
    values = dataset.data.column(column)
    missing = _rows(pc.is_null(values))
    if missing.size:
        raise UsageError(
            f"The {split} file {path} has no text in its `{column}` column in {_where(missing, builder)}: "
            f"{_missing(builder)}. Give every example its text, or remove the row."
        )
    if not _is_text(values.type):
        chosen = ", ".join(filter(None, text_columns))
        raise UsageError(
            f"The {split} file {path} has {values.type} values, not text, in its `{column}` column: the script "
            "tokenizes the columns `sentence1` and `sentence2` where both exist, else the first two columns other "
            f"than `label` (here {chosen}). Remove the columns that are not text, or name the text columns "
            "`sentence1` and `sentence2`."
        )
    blank = _blank_rows(values)
    if blank.size:
        raise UsageError(
            f"The {split} file {path} has an empty text in its `{column}` column in {_where(blank, builder)}. Give "
            "every example its text, or remove the row."
        )


def _check_labels(dataset: Dataset, split: str, path: str, builder: str) -> None:
    labels = dataset.data.column("label")
    missing, what = _rows(pc.is_null(labels)), _missing(builder)
    if not missing.size and _is_text(labels.type):
        missing, what = _blank_rows(labels), "an empty class name"
    if missing.size:
        raise UsageError(
            f"The {split} file {path} has no label in {_where(missing, builder)}: {what}. Give every example of the "
            "train and validation files its label, or remove the row (only the --test_file may be unlabelled)."
        )
    if pa.types.is_floating(labels.type):
        infinite = _rows(pc.invert(pc.is_finite(labels)))
        if infinite.size:
            value = labels[int(infinite[0]) - 1].as_py()
            raise UsageError(
                f"The {split} file {path} has the label {value} in {_where(infinite, builder)}: a label must be a "
                "finite number (or a class name)."
            )


def _check_whole_number_floats(train: Dataset, path: str) -> None:
    """A float `label` column makes the run a regression (as in run_glue.py); labels such as `0.0`/`1.0` are far more
    often a classification written with decimals than whole-number scores."""
    labels = train.data.column("label")
    if not pa.types.is_floating(labels.type) or not pc.all(pc.equal(pc.floor(labels), labels)).as_py():
        return
    values = sorted(pc.unique(labels).to_pylist())
    shown = ", ".join(map(str, values[:_LISTED_VALUES])) + (" ..." if len(values) > _LISTED_VALUES else "")
    integers = ", ".join(str(int(value)) for value in values[:_LISTED_VALUES])
    raise UsageError(
        f"The train file {path} has labels that read as floats (a float `label` column makes the run a regression: "
        f"one output, trained on the mean squared error) but are all whole numbers: {shown}. For a classification, "
        f"write the labels as integers ({integers}) or as class names, in the train and validation files. A "
        "regression on whole-number scores is rare and this script has no option to force one: it decides a "
        "regression by float labels that are not all whole numbers."
    )


def _is_text(data_type: pa.DataType) -> bool:
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


def _missing(builder: str) -> str:
    """What a missing value is in a file read by `builder`."""
    return _CSV_MISSING if builder == "csv" else "a null, or a record without the key"


def _blank_rows(values: pa.ChunkedArray) -> np.ndarray:
    """The 1-based rows of the strings `values` that are empty or only whitespace."""
    return _rows(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), False))


def _rows(mask: pa.ChunkedArray) -> np.ndarray:
    """The 1-based rows where `mask` is true."""
    return np.flatnonzero(mask.to_numpy()) + 1


def _where(rows: np.ndarray, builder: str) -> str:
    """`row 3 (...; also rows 5, 8)`: the first row, how rows are counted, and the other rows (a few of them)."""
    counted = "data rows counted from 1, the header not counted" if builder == "csv" else "records counted from 1"
    others = [str(row) for row in rows[1 : 1 + _LISTED_ROWS]]
    more = len(rows) - 1 - len(others)
    also = ""
    if others:
        also = f"; also row{'s' if len(rows) > 2 else ''} {', '.join(others)}" + (f" and {more} more" if more else "")
    return f"row {rows[0]} ({counted}{also})"
