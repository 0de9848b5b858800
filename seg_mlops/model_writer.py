"""Writes a training model's files from a copy of its variables, in a background thread.

Saving the seed Pap-Smear UNet (8.3 M parameters; with Adam's moments a 100 MB `.keras` file) takes
0.2-0.5 s on a 2-core VM, almost all of it serialising and writing; holding its variables as NumPy
arrays takes 0.01-0.02 s (bench/README.md, overhead.py). So the training thread only copies: `snapshot()` holds
the variables of the model and its optimizer as they are now, and `submit()` hands a job and a
snapshot to one worker thread. The worker loads the snapshot into a shadow model (the same config
and compile config, never trained) and lets the job save *that*: the file holds exactly the
snapshot's weights and optimizer state, however far training has moved on meanwhile.

Jobs run one at a time in the order submitted, so a later job may rely on an earlier one's file
(the resume state links the checkpoint). `drain()` waits for all of them and re-raises a job's
error; call it before anyone reads the files (fit's end), and `close()` it when fit ends by an
exception too, so that the epochs that ended are on disk. A job's error is raised by the next
`submit()` or `drain()` on the training thread.
"""

from __future__ import annotations

import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np

from seg_mlops.epoch_clock import current_lr

# Snapshots waiting for the worker at most (100 MB each for the seed UNet): past that, submit()
# waits, so memory stays bounded when saves are slower than epochs.
MAX_PENDING = 2


@dataclass(frozen=True)
class Snapshot:
    """The model's and its optimizer's variables at one moment, as NumPy arrays that keep them."""

    key: tuple[int, float]  # (optimizer step, learning rate): what changes them between copies
    weights: list[np.ndarray]
    optimizer: list[np.ndarray]


Job = Callable[[keras.Model], None]


class ModelWriter:
    """One worker thread that saves a model from snapshots (see the module docstring).

    Args:
        model: the compiled model being trained.
    """

    def __init__(self, model: keras.Model):
        self.model = model
        # The shadow is built by the worker at its first job (0.1-0.2 s off the training thread).
        # Keras keeps its global dtype policy per thread (it decides loss scaling), so the worker
        # takes the policy the writer was created under: create it under the model's. TensorFlow
        # keeps the distribution scope per thread too, so the shadow's variables are plain.
        self._config, self._compile = model.get_config(), model.get_compile_config()
        self._policy = keras.mixed_precision.global_policy().name
        self._shadow: keras.Model | None = None
        # The latest snapshot, weakly: the arrays share the variables' buffers, so while anything
        # holds them TensorFlow's next update of each variable copies it (100 MB for the seed UNet)
        # and memory holds both. The callbacks of one epoch end share it; the worker lets it go
        # once it is in the shadow.
        self._last: weakref.ref[Snapshot] | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=MAX_PENDING)
        self._error: BaseException | None = None
        self._done = threading.Condition()  # guards the counts, the error and `closed`
        self._submitted = self._finished = 0
        self._closed = False
        self._raised: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="model-writer", daemon=True)
        self._thread.start()

    def snapshot(self) -> Snapshot:
        """The variables now; the same Snapshot object while the optimizer's step and learning rate
        are unchanged and someone holds it (callbacks of one epoch end share one, unless one
        changed the LR). Equal keys mean equal values."""
        key = (int(self.model.optimizer.iterations.numpy()), current_lr(self.model))
        last = self._last() if self._last is not None else None
        if last is None or last.key != key:
            # numpy() shares the variable's buffer, and TensorFlow's next update of a variable whose
            # buffer is shared writes a new buffer (copy on write): the arrays keep this moment.
            last = Snapshot(key, [v.numpy() for v in self.model.variables],
                            [v.numpy() for v in self.model.optimizer.variables])
            self._last = weakref.ref(last)
        return last

    def submit(self, job: Job, snapshot: Snapshot) -> int:
        """Queue `job(shadow)` with `snapshot` loaded into the shadow model; returns its ticket
        (for `wait`)."""
        self._raise()
        with self._done:
            ticket, self._submitted = self._submitted, self._submitted + 1
        self._queue.put((job, snapshot))
        return ticket

    def wait(self, ticket: int) -> None:
        """Block until job `ticket` has run, or a job failed, or the writer closed. Safe from any
        thread (the MLflow uploader waits here so that it never publishes an epoch before that
        epoch's state is on disk)."""
        with self._done:
            self._done.wait_for(lambda: self._finished > ticket or self._error is not None or self._closed)

    def drain(self) -> None:
        """Wait until every submitted job has run; raise the first error a job raised."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        """Drain (errors included) and stop the worker; waiters are released either way."""
        try:
            self.drain()
        finally:
            with self._done:
                self._closed = True
                self._done.notify_all()
            self._queue.put(None)
            self._thread.join()

    def _raise(self) -> None:
        """Raise a job's error, once (it stays recorded: nothing more is written after it)."""
        with self._done:
            error = self._error
            report = error is not None and error is not self._raised
            self._raised = error
        if report:
            raise error

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            job, snapshot = item
            del item
            try:
                if self._error is None:  # after a failure nothing more is written
                    shadow = self._load(snapshot)
                    del snapshot  # in the shadow now: its arrays may go (see _last)
                    job(shadow)
            except BaseException as exc:  # noqa: BLE001 (re-raised on the training thread)
                with self._done:
                    self._error = exc
            finally:
                with self._done:
                    self._finished += 1
                    self._done.notify_all()
                self._queue.task_done()
        self._queue.task_done()

    def _load(self, snapshot: Snapshot) -> keras.Model:
        if self._shadow is None:
            keras.mixed_precision.set_global_policy(self._policy)  # (this thread's only)
            self._shadow = keras.Model.from_config(self._config)
            self._shadow.compile_from_config(self._compile)  # (builds the optimizer: the model is built)
        for variable, value in zip(self._shadow.variables, snapshot.weights):
            variable.assign(value)
        for variable, value in zip(self._shadow.optimizer.variables, snapshot.optimizer):
            variable.assign(value)
        return self._shadow
