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
