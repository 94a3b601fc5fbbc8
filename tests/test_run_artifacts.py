"""The writers of `fw_trainer.run_artifacts`: state files are replaced whole or not at all."""

import json
import os

import pytest

from fw_trainer.run_artifacts import write_json_atomic


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
