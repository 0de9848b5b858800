"""The training state a killed run needs to continue: weights, optimizer, epoch and callback state.

Plain Keras, no MLflow. `TrainingState` writes `<output>/resume/` at the end of every epoch and
restores it at the start of a resumed fit. It replaces `keras.callbacks.BackupAndRestore`, which
saves the model with its optimizer (learning rate included) and the epoch, but in two files written
one after the other (a kill between them pairs new weights with an old epoch) and without the
state of the other callbacks. Here one JSON file names its weights file and is replaced
atomically, and it also holds what Keras callbacks keep in memory: EarlyStopping's wait/best
(its best weights come back from the best checkpoint), ReduceLROnPlateau's wait/best/cooldown,
ModelCheckpoint's best value, and every epoch's logs (the history CSV rows, MLflow back-fill).

The best checkpoint (`BestCheckpoint`) holds the same weights and optimizer state as the training
state of the epoch that saved it, so in such an epoch the state's weights file is a hard link to
it rather than a second write of the same data (100 MB for the seed Pap-Smear UNet; see
bench/README.md, overhead.py, for what that saves and what writing a new file costs). Both are
written by a model_writer.ModelWriter from a copy of the variables, off the training thread.
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
from seg_mlops.model_writer import ModelWriter

STATE_DIR = "resume"
STATE_FILE = "state.json"

# Per callback class (and its subclasses, saved under the class's name), the attributes that carry
# its state between epochs (Keras 3.10+ names).
_CALLBACK_STATE = {
    keras.callbacks.EarlyStopping: ("wait", "best", "best_epoch", "stopped_epoch"),
    keras.callbacks.ReduceLROnPlateau: ("wait", "best", "cooldown_counter"),
    keras.callbacks.ModelCheckpoint: ("best",),
}


def saving_path(path: Path) -> Path:
    """Where a `.keras` file is written before it replaces `path` (a hidden file beside it)."""
    return Path(path).with_name(f".{Path(path).stem}.saving.keras")


def _state_class(callback: keras.callbacks.Callback) -> type | None:
    return next((kind for kind in _CALLBACK_STATE if isinstance(callback, kind)), None)


class BestCheckpoint(keras.callbacks.ModelCheckpoint):
    """Keras' ModelCheckpoint of the best model on a monitor (save_best_only), written whole or not
    at all and off the training thread: in an epoch that improves the monitor it snapshots the
    model and its `writer` saves the snapshot into a temporary file beside `path`, which then
    replaces `path`. Keras alone rewrites the file in place, so a kill mid-save left no best model;
    and as every save is a new file, the training state can hard-link it (TrainingState) without a
    later save changing the linked copy.

    Args:
        path: the checkpoint (`.keras`: the model, its weights and the optimizer's state).
        monitor, mode: as ModelCheckpoint's.
        writer: the training's ModelWriter (the resume state's too, so their files come in order).
    """

    def __init__(self, path: Path, monitor: str, mode: str, writer: ModelWriter):
        self.path = Path(path)
        super().__init__(saving_path(self.path), monitor=monitor, mode=mode, save_best_only=True)
        self.writer = writer
        self.saved: tuple | None = None  # the Snapshot.key of this fit's latest save

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        Path(self.filepath).unlink(missing_ok=True)  # a save a kill cut short
        self.saved = None

    def _save_model(self, epoch, batch, logs):
        if not self._should_save_model(epoch, batch, logs, self.filepath):  # (it updates self.best)
            return
        snapshot = self.writer.snapshot()
        self.saved = snapshot.key
        self.writer.submit(self._write, snapshot)

    def _write(self, shadow: keras.Model) -> None:
        shadow.save(self.filepath)
        os.replace(self.filepath, self.path)


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
    The state is written by the `writer`'s thread: whoever publishes an epoch from another thread
    waits for `wait_saved(epoch)` first.

    Args:
        out_dir: the training's output folder; the state goes to `<out_dir>/resume/`.
        callbacks: the callbacks whose state is saved (any of EarlyStopping, ReduceLROnPlateau,
            ModelCheckpoint; others are ignored); a BestCheckpoint among them is linked, not
            written again, in the epochs it saved.
        best_model: the best checkpoint, from which EarlyStopping's best weights are restored.
        writer: the training's ModelWriter (the BestCheckpoint's too).
        owner: written into the state (the MLflow run id), checked by whoever resumes it.
        state: the state to restore (None: a fresh start).
    """

    def __init__(self, out_dir: Path, callbacks: Sequence[keras.callbacks.Callback], best_model: Path,
                 writer: ModelWriter, owner: str = "", state: State | None = None):
        super().__init__()
        self.dir = state_dir(out_dir)
        self.writer = writer
        self._tickets: dict[int, int] = {}  # epoch (0-based) -> the writer's job that saves its state
        self.tracked = [c for c in callbacks if _state_class(c) is not None]
        self.checkpoint = next((c for c in callbacks if isinstance(c, BestCheckpoint)), None)
        self.best_model = Path(best_model)
        self.state = state or State(owner=owner)
        self.state.owner = owner or self.state.owner

    def on_train_begin(self, logs=None):
        if not self.state.epoch:
            return
        for callback in self.tracked:
            for name, value in self.state.callbacks.get(_state_class(callback).__name__, {}).items():
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
        self.state.callbacks = {_state_class(c).__name__: {a: _plain(getattr(c, a)) for a in _CALLBACK_STATE[
            _state_class(c)]} for c in self.tracked}
        self.save()

    def save(self) -> None:
        """Queue the epoch's state for the writer, which writes the new weights file first, then
        the JSON naming it (replacing the old one atomically), then removes the old weights: a kill
        at any point leaves a consistent (old or new) state. `wait_saved` tells when it is done."""
        snapshot = self.writer.snapshot()
        previous, epoch = self.state.weights, self.state.epoch
        # The best checkpoint saved a snapshot with this key (this epoch's step, no LR change since):
        # its file holds these weights and optimizer state (a .keras file has both), so link it.
        linked = self.checkpoint is not None and self.checkpoint.saved == snapshot.key
        name = self.state.weights = f"epoch_{epoch:04d}" + (".keras" if linked else ".weights.h5")
        text = json.dumps(self.state.__dict__, indent=1)  # now: the next epoch changes self.state

        def write(shadow: keras.Model) -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._write_weights(shadow, self.dir / name, linked)
            tmp = self.dir / (STATE_FILE + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.dir / STATE_FILE)
            if previous and previous != name:
                (self.dir / previous).unlink(missing_ok=True)

        self._tickets[epoch - 1] = self.writer.submit(write, snapshot)

    def wait_saved(self, epoch: int) -> None:
        """Block until the state of `epoch` (0-based) is on disk (or writing stopped); at once for
        an epoch this fit did not save (one before a resume). Safe from any thread."""
        ticket = self._tickets.get(epoch)
        if ticket is not None:
            self.writer.wait(ticket)

    def _write_weights(self, shadow: keras.Model, path: Path, linked: bool) -> None:
        """The snapshot's weights and optimizer state (its LR included) at `path`: a hard link to
        the best checkpoint when `linked`, or a copy where the file system has no hard links;
        else Keras' save_weights."""
        path.unlink(missing_ok=True)
        if not linked:
            shadow.save_weights(path)
            return
        try:
            os.link(self.checkpoint.path, path)
        except OSError:
            shadow.save(path)


def restore_weights(model: keras.Model, out_dir: Path, state: State) -> None:
    """Load the saved weights and optimizer state (learning rate, step, moments) into `model`,
    from either kind of weights file (`TrainingState._write_weights`)."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)  # the optimizer's variables must exist first
    model.load_weights(state_dir(out_dir) / state.weights)
