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
        # What a checkpoint keeps (`state()`), plain attributes so that transformers can also restore them itself
        # (`--restore_callback_states_from_checkpoint` sets each on a new instance).
        self.saved_seconds, self.saved_segments = 0.0, 0
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
        self.saved_seconds, self.saved_segments = self.seconds, self.segments
        return {"args": {}, "attributes": {"saved_seconds": self.saved_seconds, "saved_segments": self.saved_segments}}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # A state at step 0 is a new run (or a retry of `--auto_find_batch_size`, a trial of a search, a `train()`
        # after a crash): nothing earlier counts. A later step is a resumed checkpoint's `trainer_state.json`.
        saved = (state.stateful_callbacks or {}).get(type(self).__name__) if state.global_step > 0 else None
        attributes = saved.get("attributes", {}) if isinstance(saved, dict) else {}
        self._earlier_seconds = float(attributes.get("saved_seconds", 0.0))
        self._earlier_segments = int(attributes.get("saved_segments", 0))
        self._started = time.perf_counter()
