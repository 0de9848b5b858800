"""Logging that outlives a tracking-server outage: a background uploader with a local spool.

Training must never stop because MLflow is unreachable. `RunSink` takes a run's per-epoch records
(metrics, images) without blocking, uploads them from a background thread, and when the server
does not answer keeps them in order in memory and in `<output>/mlflow_spool/` (a JSON lines file
and PNG copies), retrying with exponential backoff. One warning line per outage, one line when the
server is back. `call()` runs the end-of-run uploads (model, artifacts) with the same retries
until a deadline. MLflow's own HTTP retries are shortened (see `tracking.use_store`) so that this
layer, not a four-minute blocking retry inside one call, decides how long to wait.
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
from mlflow import MlflowClient
from mlflow.entities import Metric

SPOOL_DIR = "mlflow_spool"
SPOOL_FILE = "pending.jsonl"
# How long the end of a run waits for a lost server before reporting the run incomplete.
WAIT_ENV = "SEG_MLOPS_SERVER_WAIT"
DEFAULT_WAIT_S = 300.0
BACKOFF_S = (1.0, 30.0)  # first and largest wait between retries


def server_wait() -> float:
    """Seconds the end of a run waits for the server ($SEG_MLOPS_SERVER_WAIT, default 300)."""
    from seg_mlops.errors import SegMlopsError

    raw = os.environ.get(WAIT_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_WAIT_S
    except ValueError:
        raise SegMlopsError(f"{WAIT_ENV}={raw!r}: expected a number of seconds") from None


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
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="mlflow-sink", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer side (training)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics at `step`, timestamped now (not when they reach the server)."""
        self._put({"kind": "metrics", "step": int(step), "time": int(time.time() * 1000),
                   "values": {k: float(v) for k, v in metrics.items()}})

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """Queue an RGB uint8 image as `key` at `step` (the UI's step slider)."""
        self._put({"kind": "image", "step": int(step), "key": key, "array": np.asarray(image)})

    def _put(self, record: dict) -> None:
        with self._cond:
            self.pending.append(record)
            if self.down_since is not None:
                self._save()  # during an outage the spool on disk holds every pending record
            else:
                self._cond.notify_all()  # during an outage the worker keeps to its backoff

    def flush(self, timeout: float) -> int:
        """Wait until every record is uploaded or `timeout` seconds pass; returns how many are
        left (kept in the spool folder for a later upload)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()  # wake the worker from its backoff: retry now
            while self.pending and time.monotonic() < deadline:
                self._cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            if self.pending:
                self._save()
            return len(self.pending)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ end-of-run uploads

    def call(self, what: str, fn: Callable[[], Any], deadline: float) -> tuple[bool, Any]:
        """Run `fn` (an upload) in this thread, retrying with backoff while the server fails, until
        `deadline` (time.monotonic()). Returns (done, result)."""
        wait = BACKOFF_S[0]
        while True:
            try:
                result = fn()
            except Exception as exc:  # MlflowException, requests/urllib3 errors: all mean "not stored"
                self._outage(exc, what)
                if time.monotonic() + wait > deadline:
                    return False, None
                time.sleep(wait)
                wait = min(2 * wait, BACKOFF_S[1])
                continue
            with self._cond:
                if not self.pending:  # else the worker reports the recovery when it has drained them
                    self._recovered()
            return True, result

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        wait = BACKOFF_S[0]
        while True:
            with self._cond:
                while not self.pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                record = self.pending[0]
            try:
                self._send(record)
            except Exception as exc:
                with self._cond:
                    self._outage(exc, f"{record['kind']} of step {record['step']}")
                    self._save()
                    self._cond.wait(wait)  # flush() or close() cut the wait short
                wait = min(2 * wait, BACKOFF_S[1])
                continue
            wait = BACKOFF_S[0]
            with self._cond:
                self.pending.popleft()
                if self.down_since is not None:
                    self.delayed += 1
                if self._on_disk:
                    self._save()  # the spool on disk keeps only what is still pending
                if not self.pending:
                    self._recovered()
                self._cond.notify_all()

    def _send(self, record: dict) -> None:
        if record["kind"] == "metrics":
            metrics = [Metric(k, v, record["time"], record["step"]) for k, v in record["values"].items()]
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        else:
            image = record.get("array")
            if image is None:
                image = _read_png(self.dir / record["file"])
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
                _write_png(self.dir / record["file"], record["array"])
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


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.asarray(image, np.uint8)).save(path)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))
