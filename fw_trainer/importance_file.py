"""`fw_importance.json`, the Fisher warm-up's state in every checkpoint: its schema, the checks a resume makes of it,
and its importance table."""

from typing import Optional

from .arguments import ADDED_OPTIONS
from .state_files import COUNT, NON_NEGATIVE, STEP_COUNT, MappingOf, nullable


# `fw_importance.json` ([`FisherWarmupCallback.state_dict`]).
_MODULE_SCHEMA = {
    "fisher": NON_NEGATIVE,
    "importance": nullable(NON_NEGATIVE),
    "penalty_weight": nullable(NON_NEGATIVE),
    "d_out": int,
    "d_in": int,
    "r": int,
    "running_state": NON_NEGATIVE,
}
# The `FWLoraArguments` that define the measured statistics and the weights, recorded under their names without the
# `fw_` prefix so that a reader of the file sees what its numbers are. A resume compares them once, with every other
# `fw_*` option, in the run's identity (`fw_run_identity.json`), not here.
RECORDED_OPTIONS = {
    "fw_warmup_steps": STEP_COUNT,
    "fw_ema_decay": NON_NEGATIVE,
    "fw_normalization": str,
    "fw_statistic": str,
    "fw_average": str,
    "fw_power": NON_NEGATIVE,
    "fw_shuffle_seed": nullable(int),
    "fw_exempt_top": COUNT,
}
# The recorded options added after files were first written, by their keys: a file that lacks one ran with the option's
# no-op value ([`ADDED_OPTIONS`]).
ADDED_KEYS = {name.removeprefix("fw_"): value for name, value in ADDED_OPTIONS.items() if name in RECORDED_OPTIONS}
IMPORTANCE_SCHEMA = {
    "frozen": bool,
    "frozen_at_step": nullable(STEP_COUNT),
    **{name.removeprefix("fw_"): schema for name, schema in RECORDED_OPTIONS.items()},
    "estimator": str,
    "num_updates": STEP_COUNT,
    "modules": MappingOf(_MODULE_SCHEMA, "their statistics"),
}


def state_problem(state: dict, matrix_names: list[str]) -> Optional[str]:
    """What makes a state that fits [`IMPORTANCE_SCHEMA`] unusable for a model with `matrix_names`, or `None`."""
    modules = state["modules"]
    if list(modules) != list(matrix_names):
        if len(modules) != len(matrix_names):
            return (
                f"it holds the statistics of {len(modules)} adapted matrices, but the model being trained has "
                f"{len(matrix_names)}"
            )
        saved, name = next((saved, name) for saved, name in zip(modules, matrix_names) if saved != name)
        return f"it lists other adapted matrices than the model being trained ({saved} where the model has {name})"
    if state["frozen"]:
        # Frozen importances have every number; a running warm-up has none yet.
        if state["frozen_at_step"] is None:
            return "`frozen_at_step` is None, not a step count"
        for name, row in modules.items():
            for key in ("importance", "penalty_weight"):
                if row[key] is None:
                    return f"the `{key}` of {name} is None, not a finite non-negative number"
    return None


def format_importance_table(state: dict) -> str:
    """The importances of a state ([`FisherWarmupCallback.state_dict`]) as a text table, most important first."""
    modules = state["modules"]
    rows = sorted(modules.items(), key=lambda item: -(item[1]["importance"] or 0.0))
    width = max(len(name) for name in modules)
    lines = [f"{'module':<{width}}  {'F':>11}  {'I':>9}  {'1 - I':>9}"]
    for name, row in rows:
        importance = row["importance"] if row["importance"] is not None else float("nan")
        lines.append(f"{name:<{width}}  {row['fisher']:>11.4e}  {importance:>9.5f}  {1 - importance:>9.5f}")
    return "\n".join(lines)
