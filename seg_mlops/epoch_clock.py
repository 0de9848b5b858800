"""One home for what every epoch adds to Keras' logs: its duration and its learning rate.

`EpochClock` is a plain Keras callback (no MLflow): it starts one clock when an epoch begins and
reads the learning rate the epoch runs with (a reducer changes it only at the epoch's end). At the
epoch's end it writes both into the epoch's logs as `lr` and `epoch_seconds`, and drops Keras'
own `learning_rate` (ReduceLROnPlateau's key for the same value): one name per concept. Keras
hands every callback the same logs dict, so the callbacks after it (the resume state, the MLflow
logger, Keras' History) all see one value from one clock. The history CSVs are not affected:
they keep the reference's columns.
"""

from __future__ import annotations

import time

import keras

LR = "lr"
SECONDS = "epoch_seconds"
KERAS_LR = "learning_rate"  # ReduceLROnPlateau's name for the LR; replaced by LR


def current_lr(model: keras.Model) -> float:
    """The optimizer's learning rate now (through a LossScaleOptimizer too)."""
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


class EpochClock(keras.callbacks.Callback):
    """Adds `lr` (the LR the epoch ran with) and `epoch_seconds` to each epoch's logs."""

    def on_epoch_begin(self, epoch, logs=None):
        self._lr = current_lr(self.model)
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        if logs is not None:
            logs.pop(KERAS_LR, None)
            logs[LR] = self._lr
            logs[SECONDS] = seconds


class TimeBudget(keras.callbacks.Callback):
    """Stops fit after the epoch past which one more epoch would overrun `minutes` of wall clock
    (train.max_minutes), judging "one more epoch" by the slowest so far after the first (whose
    tracing the next ones do not pay). Counts from the start of fit, so data checks before it
    and the evaluation after it are outside the budget."""

    def __init__(self, minutes: float, clock=time.perf_counter):
        super().__init__()
        self.seconds, self.clock = minutes * 60.0, clock
        self.durations: list[float] = []
        self.stopped_epoch: int | None = None

    def on_train_begin(self, logs=None):
        self._start = self.clock()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self.clock()

    def on_epoch_end(self, epoch, logs=None):
        now = self.clock()
        self.durations.append(now - self._epoch_start)
        slowest = max(self.durations[1:] or self.durations)
        if now - self._start + slowest > self.seconds:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            print(f"train.max_minutes={self.seconds / 60:g}: stopping after epoch {epoch + 1} "
                  f"({(now - self._start) / 60:.1f} min; one more would take up to {slowest:.0f} s)")
