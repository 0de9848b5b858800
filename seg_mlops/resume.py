"""The training state a killed run needs to continue: weights, optimizer, epoch and callback state.

Plain Keras, no MLflow. `TrainingState` writes `<output>/resume/` at the end of every epoch and
restores it at the start of a resumed fit. It replaces `keras.callbacks.BackupAndRestore`, which
saves the model with its optimizer (learning rate included) and the epoch, but in two files written
one after the other (a kill between them pairs new weights with an old epoch) and without the
state of the other callbacks. Here one JSON file names its weights file and is replaced
atomically, and it also holds what Keras callbacks keep in memory: EarlyStopping's wait/best
(its best weights come back from the best checkpoint), ReduceLROnPlateau's wait/best/cooldown,
ModelCheckpoint's best value, and every epoch's logs (the history CSV rows, MLflow back-fill).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import keras

from seg_mlops.epoch_clock import EpochClock

STATE_DIR = "resume"
STATE_FILE = "state.json"

# Per callback class, the attributes that carry its state between epochs (Keras 3.10+ names).
_CALLBACK_STATE = {
    keras.callbacks.EarlyStopping: ("wait", "best", "best_epoch", "stopped_epoch"),
    keras.callbacks.ReduceLROnPlateau: ("wait", "best", "cooldown_counter"),
    keras.callbacks.ModelCheckpoint: ("best",),
}


@dataclass
class State:
    """What `<output>/resume/state.json` holds."""

    epoch: int = 0  # epochs completed; the next fit starts at this epoch
    complete: bool = False  # fit ended (all epochs, or early stopping): only the tracked end is left
    owner: str = ""  # who trained it (the MLflow run id): a resume by anyone else is refused
    weights: str = ""  # file name, inside the state folder, of the weights + optimizer state
    rows: list[dict] = field(default_factory=list)  # one per epoch: {"epoch": e, **logs}
    callbacks: dict[str, dict] = field(default_factory=dict)


def state_dir(out_dir: Path) -> Path:
    return Path(out_dir) / STATE_DIR


def load_state(out_dir: Path) -> State | None:
    """The state saved in `out_dir`, or None when no epoch ever ended there."""
    path = state_dir(out_dir) / STATE_FILE
    if not path.is_file():
        return None
    return State(**json.loads(path.read_text()))


def clear_state(out_dir: Path) -> None:
    """Remove the state folder (a fresh training, or a run that ended FINISHED)."""
    shutil.rmtree(state_dir(out_dir), ignore_errors=True)


def history(rows: Sequence[dict]) -> dict[str, list[float]]:
    """Keras' History dict ({name: [value per epoch]}) rebuilt from the saved rows."""
    names = [k for k in (rows[0] if rows else {}) if k != "epoch"]
    return {name: [row.get(name, float("nan")) for row in rows] for name in names}


def _plain(value):
    """JSON-safe numbers (callbacks keep numpy/TF scalars; JSON has no inf, Python's json does)."""
    return None if value is None else float(value) if not isinstance(value, (int, bool)) else value


class TrainingState(EpochClock):
    """Saves the training state every epoch and restores it when resuming.

    It is also the epoch clock (epoch_clock.EpochClock): the logs it saves, and that the callbacks
    after it see, carry the epoch's `lr` and `epoch_seconds`.

    Place it after the callbacks whose state it saves (their on_train_begin resets that state, so
    the restore must come later; their on_epoch_end updates it, so the save must come later) and
    before the ones that publish the epoch (so nothing is published that a resume would redo).

    Args:
        out_dir: the training's output folder; the state goes to `<out_dir>/resume/`.
        callbacks: the callbacks whose state is saved (any of EarlyStopping, ReduceLROnPlateau,
            ModelCheckpoint; others are ignored).
        best_model: the best checkpoint, from which EarlyStopping's best weights are restored.
        owner: written into the state (the MLflow run id), checked by whoever resumes it.
        state: the state to restore (None: a fresh start).
    """

    def __init__(self, out_dir: Path, callbacks: Sequence[keras.callbacks.Callback], best_model: Path,
                 owner: str = "", state: State | None = None):
        super().__init__()
        self.dir = state_dir(out_dir)
        self.tracked = [c for c in callbacks if type(c) in _CALLBACK_STATE]
        self.best_model = Path(best_model)
        self.state = state or State(owner=owner)
        self.state.owner = owner or self.state.owner

    def on_train_begin(self, logs=None):
        if not self.state.epoch:
            return
        for callback in self.tracked:
            for name, value in self.state.callbacks.get(type(callback).__name__, {}).items():
                setattr(callback, name, value)
            if isinstance(callback, keras.callbacks.EarlyStopping) and callback.restore_best_weights \
                    and self.best_model.exists():
                # The checkpoint and EarlyStopping share monitor, mode and improvement rule, so the
                # best checkpoint holds EarlyStopping's best weights.
                callback.best_weights = keras.saving.load_model(self.best_model, compile=False).get_weights()

    def on_epoch_end(self, epoch, logs=None):
        logs = {} if logs is None else logs
        super().on_epoch_end(epoch, logs)  # the clock: lr and epoch_seconds into the shared logs
        # The row holds what the tracking layer logs per epoch (Keras' logs, lr, epoch_seconds),
        # so a resume can publish the epochs that were saved here but never reached the server.
        self.state.rows.append({"epoch": epoch, **{k: _plain(v) for k, v in logs.items()}})
        self.state.epoch = epoch + 1
        self.state.complete = bool(self.model.stop_training) or self.state.epoch >= self.params["epochs"]
        self.state.callbacks = {type(c).__name__: {a: _plain(getattr(c, a)) for a in _CALLBACK_STATE[type(c)]}
                                for c in self.tracked}
        self.save()

    def save(self) -> None:
        """New weights file first, then the JSON naming it replaces the old one atomically, then
        the old weights go: a kill at any point leaves a consistent (old or new) state."""
        self.dir.mkdir(parents=True, exist_ok=True)
        previous = self.state.weights
        self.state.weights = f"epoch_{self.state.epoch:04d}.weights.h5"
        self.model.save_weights(self.dir / self.state.weights)  # includes the optimizer (and its LR)
        tmp = self.dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state.__dict__, indent=1))
        os.replace(tmp, self.dir / STATE_FILE)
        if previous and previous != self.state.weights:
            (self.dir / previous).unlink(missing_ok=True)


def restore_weights(model: keras.Model, out_dir: Path, state: State) -> None:
    """Load the saved weights and optimizer state (learning rate, step, moments) into `model`."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)  # the optimizer's variables must exist first
    model.load_weights(state_dir(out_dir) / state.weights)
