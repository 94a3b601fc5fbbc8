"""The wall time of training summed over the segments of a resumed run: the Trainer's `train_runtime` is the last
`train()` call's only, so a run killed and resumed would report the time of its last stretch as the run's."""

import time
from typing import Any, Optional

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState


class TrainTimeCallback(TrainerCallback, ExportableState):
    """
    Keeps `train_runtime_total` (seconds of training, every segment of the run) and `train_segments` (how many
    `train()` calls it took: 1 for a run never interrupted) in every checkpoint's `trainer_state.json`, as the
    Trainer keeps a callback's state (`stateful_callbacks`), and reads them back from the checkpoint a run resumes.
    A segment's time runs from its `on_train_begin` to the last checkpoint it saved, or to its end.
    """

    def __init__(self) -> None:
        self._earlier_seconds, self._earlier_segments = 0.0, 0
        self._started: Optional[float] = None

    @property
    def seconds(self) -> float:
        """Training seconds so far, the earlier segments' and this one's."""
        return self._earlier_seconds + (time.perf_counter() - self._started if self._started is not None else 0.0)

    @property
    def segments(self) -> int:
        """The number of `train()` calls the run has taken, this one included."""
        return self._earlier_segments + (self._started is not None)

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"seconds": self.seconds, "segments": self.segments}}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # The state of a resumed checkpoint's `trainer_state.json`, or none for a new run (a retry of
        # `--auto_find_batch_size` starts its state again: the failed attempt's time is not training time).
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        attributes = saved.get("attributes", {}) if isinstance(saved, dict) else {}
        self._earlier_seconds = float(attributes.get("seconds", 0.0))
        self._earlier_segments = int(attributes.get("segments", 0))
        self._started = time.perf_counter()
