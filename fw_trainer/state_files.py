"""
The JSON state files that fw-lora adds to a checkpoint (and to the output directory): their names, the atomic writer
every one of them goes through, and the reader a resume uses, which checks a file against its schema.
"""

import json
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any, Optional, Union

from .errors import CheckpointError


# The Fisher warm-up's state: the running statistics, and the importances once frozen ([`FisherWarmupCallback`]).
IMPORTANCE_FILE = "fw_importance.json"
# What the run is (base model, task, method and its arguments, ...), compared with the run asked for on resume.
RUN_IDENTITY_FILE = "fw_run_identity.json"
# AdaLoRA's final rank pattern, written at the end of training ([`AdaLoraAllocationCallback`]).
RANK_PATTERN_FILE = "adalora_rank_pattern.json"


def write_json_atomic(path: str, data: Any) -> None:
    """
    Writes `data` as JSON to a temporary file beside `path`, flushed to disk, then renames it over `path`: readers (and
    a resume) see the old file or the whole new one, never half of it, even if the process is killed mid-write.

    Args:
        path (`str`): The file to write; its directory is created if needed.
        data (`Any`): A JSON-serialisable value.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=directory, prefix=".tmp-", suffix=".json", delete=False
    ) as f:
        try:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            # A value that is not JSON-serialisable (or a full disk) leaves no stray temporary file behind.
            f.close()
            os.unlink(f.name)
            raise
    os.replace(f.name, path)


# ----- schemas ------------------------------------------------------------------------------------------------------


class Check:
    """A schema given by a test, and what a value that passes it is (for the message)."""

    def __init__(self, test: Callable[[Any], bool], description: str):
        self.test, self.description = test, description


class MappingOf:
    """A schema: a non-empty JSON object of named entries (`what`), each matching `schema`."""

    def __init__(self, schema: "Schema", what: str):
        self.schema, self.what = schema, what


# A `dict` (a JSON object with exactly these keys, each value matching its schema), a type or tuple of types (`int`
# never matches a JSON `true`), a [`Check`] or a [`MappingOf`].
Schema = Union[dict, type, tuple, Check, MappingOf]


def _is_number(value: Any, integer: bool = False) -> bool:
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)


NON_NEGATIVE = Check(lambda value: _is_number(value) and value >= 0, "a finite non-negative number")
STEP_COUNT = Check(lambda value: _is_number(value, integer=True) and value >= 0, "a step count")
COUNT = Check(lambda value: _is_number(value, integer=True) and value >= 0, "a non-negative integer")
OBJECT_SCHEMA = Check(lambda value: isinstance(value, dict), "a mapping")


def nullable(schema: Schema) -> Check:
    """`null`, or a value of `schema`."""
    return Check(lambda value: value is None or schema_problem(value, schema) is None, f"null or {_describe(schema)}")


def _describe(schema: Schema) -> str:
    if isinstance(schema, (Check, MappingOf)):
        return schema.description if isinstance(schema, Check) else f"a mapping of names to {schema.what}"
    if isinstance(schema, dict):
        return "a mapping"
    kinds = schema if isinstance(schema, tuple) else (schema,)
    return " or ".join({bool: "true or false", str: "a string", list: "a list"}.get(k, k.__name__) for k in kinds)


def schema_problem(value: Any, schema: Schema, where: str = "it") -> Optional[str]:
    """What makes `value` (read from JSON) not match `schema`, in words, or `None` when it does."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{where} is not a mapping"
        unknown = sorted(set(value) - set(schema))
        missing = [key for key in schema if key not in value]
        if unknown or missing:
            parts = [f"unknown keys {', '.join(unknown)}"] * bool(unknown) + [f"no {', '.join(missing)}"] * bool(
                missing
            )
            return f"{where} has {' and '.join(parts)}"
        for key, key_schema in schema.items():
            problem = schema_problem(
                value[key], key_schema, f"`{key}`" if where == "it" else f"the `{key}` of {where}"
            )
            if problem is not None:
                return problem
        return None
    if isinstance(schema, MappingOf):
        if not isinstance(value, dict) or not value:
            return f"{where} is not {_describe(schema)}"
        for name, entry in value.items():
            problem = schema_problem(entry, schema.schema, name)
            if problem is not None:
                return problem
        return None
    if isinstance(schema, Check):
        return None if schema.test(value) else f"{where} is {value!r}, not {schema.description}"
    kinds = schema if isinstance(schema, tuple) else (schema,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        return f"{where} is {value!r}, not {_describe(schema)}"
    return None


def read_state_file(
    path: str,
    schema: Schema,
    problem: Optional[Callable[[Any], Optional[str]]] = None,
    added_keys: Optional[dict[str, Any]] = None,
) -> Any:
    """
    Reads a JSON state file from a checkpoint (`fw_importance.json`, `fw_run_identity.json`), for a resume.

    Args:
        path (`str`): The file.
        schema: What the file holds (see [`schema_problem`]).
        problem (`Callable`, *optional*): What else makes a content that fits the schema unusable, or `None`.
        added_keys (`dict`, *optional*): Keys the file's schema gained after files were first written, with the value
            an older file means by lacking one; set where the file (a JSON object) lacks them.

    Raises:
        `CheckpointError`: If the file is not valid JSON (a damaged file), does not fit `schema`, or `problem` names a
            problem.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        found = f"not valid JSON ({error})"
    else:
        if isinstance(data, dict) and added_keys:
            data = {**added_keys, **data}
        found = schema_problem(data, schema)
        if found is None and problem is not None:
            found = problem(data)
    if found is not None:
        raise CheckpointError(
            f"{path} is damaged or inconsistent: {found}. Resume from an earlier checkpoint, or start a new run "
            "instead of resuming."
        )
    return data
