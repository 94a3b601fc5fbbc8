"""
A `run_glue_fw.py` run killed with SIGKILL while it saves a checkpoint, for `tests/test_run_glue_fw_faults.py`.

Usage: `python tests/interrupted_worker.py KILL_POINT CHECKPOINT [run_glue_fw.py arguments ...]`, where `CHECKPOINT` is
the name of the checkpoint folder to die in (e.g. `checkpoint-8`) and `KILL_POINT` the moment:

- `importances`: `fw_importance.json` is written to its temporary file, and the process dies before renaming it;
- `trainer_state`: half of `trainer_state.json`, the last file the Trainer writes into a checkpoint, is written.
"""

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path


# This checkout's `fw_trainer`, whatever else is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import TrainerState  # noqa: E402

from fw_trainer.glue import run as run_glue_fw  # noqa: E402
from fw_trainer.state_files import IMPORTANCE_FILE  # noqa: E402


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    kill_point, checkpoint, *argv = sys.argv[1:]
    if kill_point == "importances":
        replace = os.replace

        def replace_or_die(src, dst):
            if Path(dst).parent.name == checkpoint and Path(dst).name == IMPORTANCE_FILE:
                die()
            replace(src, dst)

        os.replace = replace_or_die
    elif kill_point == "trainer_state":
        save_to_json = TrainerState.save_to_json

        def save_half_then_die(self, json_path):
            if Path(json_path).parent.name != checkpoint:
                return save_to_json(self, json_path)
            text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)
            with open(json_path, "w") as f:
                f.write(text[: len(text) // 2])
            die()

        TrainerState.save_to_json = save_half_then_die
    else:
        raise SystemExit(f"unknown kill point {kill_point!r}")
    return run_glue_fw.main(argv)


if __name__ == "__main__":
    sys.exit(main())
