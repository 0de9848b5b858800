"""Logging that outlives a tracking-server outage: a background uploader with a local spool.

Training must never stop because MLflow is unreachable. `RunSink` takes a run's per-epoch records
(metrics, images) without blocking, uploads them from a background thread, and when the server
does not answer keeps them in order in memory and in `<output>/mlflow_spool/` (a JSON lines file
and PNG copies), retrying with exponential backoff. One warning line per outage, one line when the
server is back. `call()` runs the end-of-run uploads (model, artifacts) with the same retries
until a deadline. MLflow's own HTTP retries are shortened (see `tracking.use_store`) so that this
layer, not a four-minute blocking retry inside one call, decides how long to wait.

Only what a wait can cure is retried (`transient`: no connection, a timeout, HTTP 5xx, 429). An
answer that will not change (a deleted run, an invalid value: HTTP 4xx) is `Refused`: reported at
once in one line naming the run and the call, and nothing more is uploaded to that run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import numpy as np
import requests
import urllib3
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE, NOT_IMPLEMENTED, ErrorCode

from seg_mlops import data
from seg_mlops.errors import SegMlopsError

SPOOL_DIR = "mlflow_spool"
SPOOL_FILE = "pending.jsonl"
# How long the end of a run waits for a lost server before reporting the run incomplete.
WAIT_ENV = "SEG_MLOPS_SERVER_WAIT"
DEFAULT_WAIT_S = 300.0
BACKOFF_S = (1.0, 30.0)  # first and largest wait between retries
# No answer from the server: requests' errors, urllib3's where they escape requests, the builtin
# ConnectionError (refused, reset) and TimeoutError.
NETWORK_ERRORS = (requests.ConnectionError, requests.Timeout, urllib3.exceptions.ProtocolError,
                  urllib3.exceptions.TimeoutError, urllib3.exceptions.MaxRetryError, ConnectionError, TimeoutError)
# MLflow maps these error codes to HTTP 5xx, yet no wait changes the answer.
PERMANENT_5XX = {ErrorCode.Name(INVALID_STATE), ErrorCode.Name(NOT_IMPLEMENTED)}


class Refused(SegMlopsError):
    """The tracking server refused an upload for good (e.g. the run was deleted)."""


def server_wait() -> float:
    """Seconds the end of a run waits for the server ($SEG_MLOPS_SERVER_WAIT, default 300)."""
    raw = os.environ.get(WAIT_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_WAIT_S
    except ValueError:
        raise SegMlopsError(f"{WAIT_ENV}={raw!r}: expected a number of seconds") from None


def transient(exc: BaseException) -> bool:
    """Whether a failed upload may succeed if retried later: no connection, a timeout, HTTP 5xx or
    429. MLflow raises RestException (the server's error code) for an answer, and a plain
    MlflowException (code INTERNAL_ERROR, i.e. 500) around a connection error once its own retries
    are exhausted; artifact uploads raise requests' errors."""
    if isinstance(exc, MlflowException):
        return exc.error_code not in PERMANENT_5XX and _retryable_status(exc.get_http_status_code())
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return _retryable_status(exc.response.status_code)
    return isinstance(exc, NETWORK_ERRORS)


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


class Backoff:
    """The waits between retries: BACKOFF_S[0] doubling up to BACKOFF_S[1]; `reset` after a success."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.wait = BACKOFF_S[0]

    def next(self) -> float:
        wait, self.wait = self.wait, min(2 * self.wait, BACKOFF_S[1])
        return wait


def _brief(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


class RunSink:
    """Per-epoch records of one MLflow run, uploaded in order from a background thread.

    Args:
        run_id: the run the records belong to.
        out_dir: the training's output folder; the spool lives in `<out_dir>/mlflow_spool/`.
        replay: upload first the images a previous process of this run left in the spool (the
            server was down when it ended). Its metrics are dropped: the resume republishes every
            epoch's metrics from the training state, checking what the server already has, which
            a blind replay could duplicate. False: a fresh run, any old spool is removed.
    """

    def __init__(self, run_id: str, out_dir: Path, replay: bool = False):
        self.run_id = run_id
        self.client = MlflowClient()
        self.dir = Path(out_dir) / SPOOL_DIR
        if not replay:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.pending: deque[dict] = deque(r for r in self._load() if r["kind"] == "image")
        self._on_disk = (self.dir / SPOOL_FILE).is_file()
        if self._on_disk:
            self._save()  # without the dropped metrics (or removed, when nothing else is left)
        self.down_since: float | None = None  # start of the current outage
        self.outages = 0
        self.delayed = 0  # records uploaded late (after an outage)
        self.refused: str | None = None  # the message of an upload the server refused for good
        self.gate: Callable[[int], None] | None = None  # see gated()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="mlflow-sink", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer side (training)

    def gated(self, gate: Callable[[int], None]) -> "RunSink":
        """Make the uploader call `gate(step)` before it uploads a record of `step`, and return the
        sink. The training's gate blocks until the epoch's resume state is on disk: nothing reaches
        the server that a resume would redo (and so log twice at one step)."""
        self.gate = gate
        return self

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics at `step`, timestamped now (not when they reach the server)."""
        self._put({"kind": "metrics", "step": int(step), "time": int(time.time() * 1000),
                   "values": {k: float(v) for k, v in metrics.items()}})

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """Queue an RGB uint8 image as `key` at `step` (the UI's step slider)."""
        self._put({"kind": "image", "step": int(step), "key": key, "array": np.asarray(image)})

    def _put(self, record: dict) -> None:
        with self._cond:
            self._check()
            self.pending.append(record)
            if self.down_since is not None:
                self._save()  # during an outage the spool on disk holds every pending record
            else:
                self._cond.notify_all()  # during an outage the worker keeps to its backoff

    def flush(self, timeout: float) -> int:
        """Wait until every record is uploaded or `timeout` seconds pass; returns how many are
        left (kept in the spool folder for a later upload). Raises Refused if the server refused
        one for good."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()  # wake the worker from its backoff: retry now
            while self.pending and self.refused is None and time.monotonic() < deadline:
                self._cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            self._check()
            if self.pending:
                self._save()
            return len(self.pending)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _check(self) -> None:
        """Raise the server's refusal, if any: once one upload is refused, every later call fails.
        A fresh exception each time: re-raising one object would pile up its tracebacks."""
        if self.refused is not None:
            raise Refused(self.refused)

    # ------------------------------------------------------------------ end-of-run uploads

    def call(self, what: str, fn: Callable[[], Any], deadline: float) -> tuple[bool, Any]:
        """Run `fn` (an upload) in this thread, retrying with backoff while the server is
        unreachable, until `deadline` (time.monotonic()). Returns (done, result); raises Refused
        when the server refuses it (or refused an earlier upload)."""
        self._check()
        backoff = Backoff()
        while True:
            done, result = self._attempt(what, fn)
            if done:
                with self._cond:
                    if not self.pending:  # else the worker reports the recovery when it has drained them
                        self._recovered()
                return True, result
            wait = backoff.next()
            if time.monotonic() + wait > deadline:
                return False, None
            time.sleep(wait)

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        backoff = Backoff()
        while True:
            with self._cond:
                while not self.pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                record = self.pending[0]
            if self.gate is not None:
                self.gate(record["step"])
            try:
                done, _ = self._attempt(_call_name(record), lambda: self._send(record))
            except Refused as exc:
                # This thread cannot stop the training: it says so now, and the training's next
                # sink call (the next epoch's records, or the end of the run) raises the refusal,
                # so the run ends FAILED within an epoch instead of training on, unlogged. The
                # records stay in the spool folder.
                print(f"error: {exc}; the training stops at the end of this epoch", file=sys.stderr, flush=True)
                with self._cond:
                    self._save()
                return
            if not done:
                with self._cond:
                    self._save()
                    self._cond.wait(backoff.next())  # flush() or close() cut the wait short
                continue
            backoff.reset()
            with self._cond:
                self.pending.popleft()
                if self.down_since is not None:
                    self.delayed += 1
                if self._on_disk:
                    self._save()  # the spool on disk keeps only what is still pending
                if not self.pending:
                    self._recovered()
                self._cond.notify_all()

    def _attempt(self, what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """One try of an upload, for both the worker and `call`: (True, result) when it is stored,
        (False, None) when the server is unreachable (an outage, retried by the caller); a refusal
        for good raises Refused naming the run and `what`, and every later call raises it too."""
        try:
            return True, fn()
        except Refused:
            raise  # a refusal already recorded (call() of a flush): reported as it is
        except Exception as exc:  # MlflowException, requests errors... sorted by `transient`
            with self._cond:
                if transient(exc):
                    self._outage(exc, what)
                    return False, None
                self.refused = (f"run {self.run_id}: tracking server {self.client.tracking_uri} refused {what} "
                                f"({_brief(exc)}); nothing more is uploaded to this run (a deleted run can be "
                                f"restored: mlflow runs restore --run-id {self.run_id})")
                self._cond.notify_all()  # a flush() waiting for the records returns now
            raise Refused(self.refused) from exc

    def _send(self, record: dict) -> None:
        if record["kind"] == "metrics":
            metrics = [Metric(k, v, record["time"], record["step"]) for k, v in record["values"].items()]
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        else:
            image = record.get("array")
            if image is None:
                image = data.read_rgb(self.dir / record["file"])
            self.client.log_image(self.run_id, image, key=record["key"], step=record["step"], synchronous=True)

    # ------------------------------------------------------------------ outage bookkeeping

    def _outage(self, exc: BaseException, what: str) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1
            print(f"warning: tracking server {self.client.tracking_uri} failed ({_brief(exc)}) on {what}; "
                  f"training goes on, records are kept in {self.dir} and retried with backoff",
                  file=sys.stderr, flush=True)

    def _recovered(self) -> None:
        if self.down_since is not None:
            print(f"tracking server {self.client.tracking_uri} is back after "
                  f"{time.monotonic() - self.down_since:.0f} s: {self.delayed} delayed records uploaded",
                  file=sys.stderr, flush=True)
            self.down_since = None
            self.delayed = 0

    # ------------------------------------------------------------------ the spool on disk

    def _save(self) -> None:
        """Write the pending records (images as PNG files) to the spool; remove it when empty."""
        if not self.pending:
            shutil.rmtree(self.dir, ignore_errors=True)
            self._on_disk = False
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for record in self.pending:
            if record["kind"] == "image" and "file" not in record:
                record["file"] = f"{record['step']:05d}_{time.time_ns()}.png"
                data.write_rgb(self.dir / record["file"], record["array"])
            lines.append(json.dumps({k: v for k, v in record.items() if k != "array"}))
        tmp = self.dir / (SPOOL_FILE + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.dir / SPOOL_FILE)
        self._on_disk = True
        keep = {r["file"] for r in self.pending if "file" in r}
        for png in self.dir.glob("*.png"):
            if png.name not in keep:
                png.unlink(missing_ok=True)

    def _load(self) -> list[dict]:
        path = self.dir / SPOOL_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _call_name(record: dict) -> str:
    """The MLflow call that uploads `record`, for messages."""
    if record["kind"] == "metrics":
        return f"log_batch of step {record['step']}"
    return f"log_image {record['key']} of step {record['step']}"


