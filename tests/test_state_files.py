"""`fw_trainer.state_files`: state files are replaced whole or not at all, and checked against their schema (by
hand-written expectations of what each fault is called)."""

import json
import os

import pytest

from fw_trainer.state_files import (
    NON_NEGATIVE,
    STEP_COUNT,
    MappingOf,
    nullable,
    schema_problem,
    write_json_atomic,
)


def test_write_json_atomic_replaces_the_whole_file(tmp_path):
    path = tmp_path / "new" / "state.json"
    write_json_atomic(str(path), {"a": 1})
    write_json_atomic(str(path), {"b": [1, 2]})
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert os.listdir(path.parent) == ["state.json"]


@pytest.mark.parametrize("failure", ["serialisation", "rename"])
def test_an_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "state.json"
    write_json_atomic(str(path), {"step": 4})
    if failure == "serialisation":
        data = {"step": object()}  # fails half-way through `json.dump`
    else:
        data = {"step": 8}

        def killed(src, dst):  # the process dies after the temporary file is written, before the rename
            raise KeyboardInterrupt

        monkeypatch.setattr(os, "replace", killed)
    with pytest.raises((TypeError, KeyboardInterrupt)):
        write_json_atomic(str(path), data)
    assert json.loads(path.read_text()) == {"step": 4}
    # A failed serialisation cleans up after itself; a kill before the rename leaves only a hidden temporary file.
    leftovers = sorted(set(os.listdir(tmp_path)) - {"state.json"})
    if failure == "serialisation":
        assert leftovers == []
    else:
        assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")


SCHEMA = {
    "frozen": bool,
    "step": STEP_COUNT,
    "value": nullable(NON_NEGATIVE),
    "rows": MappingOf({"x": NON_NEGATIVE}, "their rows"),
}
VALID = {"frozen": True, "step": 3, "value": None, "rows": {"a": {"x": 1.5}}}


@pytest.mark.parametrize(
    "change, problem",
    [
        ({}, None),
        ({"value": 0.5}, None),
        ({"extra": 1}, "it has unknown keys extra"),
        ({"step": 2.5}, "`step` is 2.5, not a step count"),
        ({"step": True}, "`step` is True, not a step count"),
        ({"frozen": 1}, "`frozen` is 1, not true or false"),
        ({"value": -1.0}, "`value` is -1.0, not null or a finite non-negative number"),
        ({"value": float("nan")}, "`value` is nan, not null or a finite non-negative number"),
        ({"rows": {}}, "`rows` is not a mapping of names to their rows"),
        ({"rows": {"a": {"x": "y"}}}, "the `x` of a is 'y', not a finite non-negative number"),
        ({"rows": {"a": {}}}, "a has no x"),
    ],
)
def test_schema_problem_names_what_does_not_fit(change, problem):
    assert schema_problem({**VALID, **change}, SCHEMA) == problem


def test_a_missing_key_is_named():
    state = dict(VALID)
    del state["step"]
    assert schema_problem(state, SCHEMA) == "it has no step"
