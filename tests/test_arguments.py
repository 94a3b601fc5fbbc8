"""Validation of `FWLoraArguments` and parsing next to `TrainingArguments`."""

import inspect

import pytest
import torch
from conftest import lora_model
from transformers import HfArgumentParser, TrainingArguments

from fw_trainer import FisherEstimator, FisherWeightedPenalty, FWLoraArguments, normalize_importances
from fw_trainer.arguments import DOMAINS, ESTIMATORS, METHODS, NORMALIZATIONS, PENALTIES
from fw_trainer.importance import exempt_largest, penalty_weights, shuffled


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "dora"}, "`method` should be one of"),
        ({"fw_lambda": -1e-4}, "`fw_lambda` should be greater than or equal to 0"),
        ({"fw_ema_decay": 1.0}, r"`fw_ema_decay` should be in \(0, 1\)"),
        ({"fw_ema_decay": 0.0}, r"`fw_ema_decay` should be in \(0, 1\)"),
        ({"fw_warmup_steps": -1}, "`fw_warmup_steps` should be greater than or equal to 0"),
        ({"fw_normalization": "softmax"}, "`fw_normalization` should be one of"),
        ({"fw_penalty": "l1"}, "`fw_penalty` should be one of"),
        ({"lora_r": 0}, "`lora_r` should be a positive integer"),
        ({"lora_r": 4, "lora_budget": 0.2}, "mutually exclusive"),
        ({"lora_budget": 0.0}, r"`lora_budget` should be a percentage in \(0, 100\]"),
        ({"lora_dropout": 1.0}, r"`lora_dropout` should be in \[0, 1\)"),
        ({"lora_target_modules": []}, "at least one module"),
        ({"adalora_beta1": 1.0}, r"`adalora_beta1` should be in \(0, 1\)"),
        ({"adalora_delta_t": 0}, "`adalora_delta_t` should be >= 1"),
        ({"adalora_init_r_ratio": 0.5}, "`adalora_init_r_ratio` should be at least 1"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FWLoraArguments(**kwargs)


def test_defaults_are_the_papers():
    args = FWLoraArguments()
    assert (args.method, args.fw_lambda, args.fw_warmup_steps, args.fw_ema_decay) == ("fw_lora", 1e-4, 500, 0.98)
    assert (args.fw_normalization, args.fw_penalty) == ("sum", "delta")


def test_parsed_next_to_training_arguments(tmp_path):
    parser = HfArgumentParser((FWLoraArguments, TrainingArguments))
    fw_args, training_args = parser.parse_args_into_dataclasses(
        [
            "--method", "fw_lora", "--fw_warmup_steps", "300", "--warmup_steps", "0.06", "--output_dir", str(tmp_path),
            "--lora_target_modules", "query", "value", "--fw_normalization", "max",
        ]
    )  # fmt: skip
    assert fw_args.fw_warmup_steps == 300 and training_args.warmup_steps == 0.06
    assert fw_args.lora_target_modules == ["query", "value"] and fw_args.fw_normalization == "max"


def test_bad_value_on_the_command_line_fails():
    parser = HfArgumentParser((FWLoraArguments,))
    with pytest.raises(ValueError, match="`fw_lambda`"):
        parser.parse_args_into_dataclasses(["--fw_lambda", "-1"])


def test_help_lists_the_allowed_values_and_the_parser_rejects_others():
    parser = HfArgumentParser(FWLoraArguments)
    help_text = " ".join(parser.format_help().split())
    for values in (METHODS, ESTIMATORS, NORMALIZATIONS, PENALTIES):
        assert "{" + ",".join(values) + "}" in help_text
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--fw_estimator", "exactly"])


# The keyword arguments of the classes a custom loop uses, by the `FWLoraArguments` field they stand for.
KEYWORD_OPTIONS = [
    (FisherEstimator, "statistic", "fw_statistic"),
    (FisherEstimator, "average", "fw_average"),
    (FisherEstimator, "ema_decay", "fw_ema_decay"),
    (FisherEstimator, "estimator", "fw_estimator"),
    (FisherEstimator, "sketch_probes", "fw_sketch_probes"),
    (FisherWeightedPenalty, "penalty", "fw_penalty"),
    (normalize_importances, "normalization", "fw_normalization"),
    (penalty_weights, "power", "fw_power"),
]


@pytest.mark.parametrize("owner, keyword, option", KEYWORD_OPTIONS)
def test_keyword_defaults_are_the_dataclass_defaults(owner, keyword, option):
    assert inspect.signature(owner).parameters[keyword].default == getattr(FWLoraArguments(), option)


def test_the_estimator_checks_its_options_where_the_dataclass_does():
    model, _ = lora_model()
    for keyword, value in (("ema_decay", 1.5), ("estimator", "approximate"), ("sketch_probes", 0)):
        with pytest.raises(ValueError, match=f"`{keyword}` should be"):
            FisherEstimator(model, **{keyword: value})


def test_from_args_builds_the_estimator_the_arguments_describe():
    model, fw_args = lora_model(method="iw_lora", fw_estimator="sketch", fw_sketch_probes=3, fw_ema_decay=0.9)
    estimator = FisherEstimator.from_args(model, fw_args, seed=7)
    assert (estimator.statistic, estimator.average, estimator.kind) == ("norm", "mean", "sketch")
    assert (estimator.sketch_probes, estimator.ema_decay, estimator.seed) == (3, 0.9, 7)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("option", ["fw_lambda", "fw_power", "lora_alpha", "adalora_orth_reg_weight"])
def test_non_finite_numbers_are_refused(option, value):
    with pytest.raises(ValueError, match=f"`{option}` should be"):
        FWLoraArguments(**{option: value})


@pytest.mark.parametrize("option", sorted(name for name, domain in DOMAINS.items() if domain.integer))
def test_integer_options_given_as_whole_floats_become_integers(option):
    # A Python caller (or `HfArgumentParser.parse_dict`) can pass `1.0` where a count is meant; the value is allowed
    # (it is whole) but was kept a float, which failed where it is used as a count (a slice at the freeze, a tensor's
    # size) and in the schema of the checkpoint files that record it.
    value = DOMAINS[option].low + 1.0
    args = FWLoraArguments(**{option: value})
    assert type(getattr(args, option)) is int and getattr(args, option) == value


def test_functions_that_take_a_count_take_a_whole_float_as_that_count():
    """Failed before: `exempt_largest` with `1.0` raised "slice indices must be integers", a sketch estimator with
    `sketch_probes=2.0` a TypeError from `torch.empty`."""
    fisher = torch.tensor([0.2, 0.5, 0.3])
    torch.testing.assert_close(exempt_largest(torch.ones(3), fisher, 1.0), torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(shuffled(fisher, 3.0), shuffled(fisher, 3))
    model, _ = lora_model()
    estimator = FisherEstimator(model, estimator="sketch", sketch_probes=2.0)
    assert type(estimator.sketch_probes) is int and estimator.sketch_probes == 2
