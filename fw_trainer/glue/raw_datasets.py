"""Where the GLUE script's raw data comes from: a local GLUE folder, the Hugging Face Hub, or your own csv/json
files."""

import itertools
import os
from typing import Optional

from datasets import DatasetDict, load_dataset

from ..errors import UsageError
from .arguments import DataTrainingArguments, ModelArguments
from .data_checks import check_examples
from .tsv_layout import TASK_TO_KEYS, load_glue_dir


def load_raw_datasets(model_args: ModelArguments, data_args: DataTrainingArguments, do_predict: bool) -> DatasetDict:
    """
    The raw splits the script trains and evaluates on: a GLUE task from `--glue_dir` (the original TSV layout, see
    [`load_glue_dir`]) or else from the Hub, a Hub dataset, or local csv/json files (each split read on its own, so
    that a test file without labels loads).

    Raises:
        `UsageError`: If the data cannot be found or read, the files' columns do not fit together, or a row of your
        own files cannot be trained or evaluated on ([`check_examples`]).
    """
    if data_args.task_name is not None and data_args.glue_dir:
        try:
            return load_glue_dir(data_args.glue_dir, data_args.task_name)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(str(error)) from error
    if data_args.task_name is not None or data_args.dataset_name is not None:
        name, config = (
            ("nyu-mll/glue", data_args.task_name)
            if data_args.task_name is not None
            else (data_args.dataset_name, data_args.dataset_config_name)
        )
        try:
            return load_dataset(name, config, cache_dir=model_args.cache_dir, token=model_args.token)
        except Exception as error:  # offline, DNS, HTTP, missing config: the Hub fails in many ways
            raise UsageError(
                f"Could not load the dataset {name} ({config}) from the Hugging Face Hub: {type(error).__name__}: "
                f"{error}. Offline, pass --glue_dir (or set GLUE_DIR) to a folder with the GLUE data in its original "
                "TSV layout (e.g. SST-2/train.tsv), or --train_file/--validation_file."
            ) from error

    data_files = {"train": data_args.train_file, "validation": data_args.validation_file}
    if do_predict:
        if data_args.test_file is None:
            raise UsageError("--do_predict needs a GLUE --task_name or a --test_file.")
        data_files["test"] = data_args.test_file
    builder = "csv" if data_args.train_file.endswith(".csv") else "json"
    for split, path in data_files.items():
        if not os.path.isfile(path):
            raise UsageError(f"The {split} file {path} does not exist.")
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line for line in itertools.islice(f, 2) if line.strip()]
        if len(lines) < (2 if builder == "csv" else 1):  # a csv's first line is its header
            found = "is empty" if not lines else "has no rows, only a header"
            raise UsageError(f"The {split} file {path} {found}. Give it at least one example.")
    # One split at a time: `load_dataset` would fail with a schema error on files whose columns differ.
    raw_datasets = DatasetDict()
    for split, path in data_files.items():
        try:
            raw_datasets[split] = load_dataset(builder, data_files={split: path}, cache_dir=model_args.cache_dir)[
                split
            ]
        except Exception as error:  # an empty file, a broken row: pandas and pyarrow fail in many ways
            raise UsageError(
                f"Could not read the {split} file {path} as {builder} ({type(error).__name__}: "
                f"{' '.join(str(error).split())[:300]}). Check that it is a {builder} file with a header row."
            ) from error
    expected = set(raw_datasets["train"].column_names)
    if "label" not in expected:
        raise UsageError(
            f"The train file {data_args.train_file} has no `label` column (columns: "
            f"{', '.join(sorted(expected))}). Name the target column `label`."
        )
    if expected == {"label"}:
        raise UsageError(
            f"The train file {data_args.train_file} has no column besides `label`. Add the text of each example in a "
            "column (two columns, e.g. `sentence1` and `sentence2`, for a pair task)."
        )
    if "label" not in raw_datasets["validation"].column_names:
        raise UsageError(
            f"The validation file {data_args.validation_file} has no `label` column (columns: "
            f"{', '.join(sorted(raw_datasets['validation'].column_names))}): the dev set is scored against its "
            "labels. Add them in a column named `label`; an unlabelled file can be predicted on as --test_file (with "
            "--do_predict)."
        )
    for split, dataset in raw_datasets.items():
        columns = set(dataset.column_names) | ({"label"} if split == "test" else set())
        if columns != expected:
            raise UsageError(
                f"The {split} file {data_files[split]} has the columns {', '.join(sorted(dataset.column_names))} but "
                f"the train file has {', '.join(sorted(expected))}. Give every file the same columns."
            )
    check_examples(raw_datasets, data_files, builder, sentence_keys(raw_datasets, None))
    if labels_of(raw_datasets, None) is not None and "validation" in raw_datasets:
        # A label the training data lacks has no output of the classifier: it would fail, or be scored as never right.
        unseen = sorted(set(raw_datasets["validation"].unique("label")) - set(raw_datasets["train"].unique("label")))
        if unseen:
            raise UsageError(
                f"The validation file {data_files['validation']} has labels that the train file lacks: "
                f"{', '.join(map(str, unseen[:5]))}{' ...' if len(unseen) > 5 else ''}. Every label must occur in "
                "the training data."
            )
    return raw_datasets


def labels_of(raw_datasets: DatasetDict, task_name: Optional[str]) -> Optional[list]:
    """The label names (a GLUE task) or values (your files) of the training split, sorted; `None` for a regression
    (STS-B, or float labels)."""
    train = raw_datasets["train"]
    if task_name is not None:
        return None if task_name == "stsb" else train.features["label"].names
    return None if train.features["label"].dtype in ["float32", "float64"] else sorted(train.unique("label"))


def sentence_keys(raw_datasets: DatasetDict, task_name: Optional[str]) -> tuple[str, Optional[str]]:
    """The text columns, as run_glue.py picks them: the GLUE task's, else `sentence1`/`sentence2`, else the first two
    columns other than `label` (or the one)."""
    if task_name is not None:
        return TASK_TO_KEYS[task_name]
    non_label_column_names = [name for name in raw_datasets["train"].column_names if name != "label"]
    if "sentence1" in non_label_column_names and "sentence2" in non_label_column_names:
        return "sentence1", "sentence2"
    if len(non_label_column_names) >= 2:
        return tuple(non_label_column_names[:2])
    return non_label_column_names[0], None
