"""Tracking-server faults with a real `mlflow server` process: lost mid-run and back (training goes
on, nothing is lost), lost for good (a one-line report naming the local folder, a non-zero exit,
and a later resume uploads everything)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import mlflow
import pytest
import requests
import urllib3
from mlflow.exceptions import RestException

from seg_mlops import lifecycle, resume, spool, tracking
from seg_mlops.errors import SegMlopsError
from tests.test_mlflow import MLFLOW, free_port, venv_env, wait_http
from tests.test_resume import epochs_saved, write_yaml

METRICS = ("loss", "val_loss", "dice_coef", "val_dice_coef", "lr", "epoch_seconds")


def http_error(status: int) -> requests.HTTPError:
    """What requests raises for a response with this status (an artifact upload's answer)."""
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} error", response=response)


class Server:
    """A real `mlflow server` on a fixed loopback port that can be killed and started again."""

    def __init__(self, tmp_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                     "--artifacts-destination", str(tmp_path / "server-artifacts"),
                     "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, env=venv_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_http(self.url + "/health", self.proc, seconds=300)  # busy CI machines start slowly
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL, as a crash or a reboot would: no goodbye to the clients."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path)
    srv.start()
    yield srv
    srv.kill()


class Outage(keras.callbacks.Callback):
    """Kills the server when epoch `down` begins and starts it again after epoch `up` ended."""

    def __init__(self, srv: Server, down: int, up: int):
        super().__init__()
        self.srv, self.down, self.up = srv, down, up

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.down:
            self.srv.kill()

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.up:
            self.srv.start()


def assert_every_epoch_once(run_id: str, epochs: int) -> None:
    client = mlflow.MlflowClient()
    for name in METRICS:
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == list(range(epochs)), name


def test_server_lost_mid_run_and_back(server, tiny_cfg, monkeypatch, capfd):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv(spool.WAIT_ENV, "120")
    cfg = tiny_cfg("experiment=server-outage", "train.epochs=6")
    # Down during epochs 1-3: the metrics and panels of three epochs wait in the spool.
    result, run_id = tracking.train(cfg, extra_callbacks=[Outage(server, down=1, up=3)])
    assert len(result.history["loss"]) == 6  # training went on through the outage
    err = capfd.readouterr().err
    # One warning for the outage (not one per failed call), one line when the server is back.
    assert err.count(f"warning: tracking server {server.url} failed") == 1, err[-2000:]
    assert err.count(f"tracking server {server.url} is back") == 1, err[-2000:]

    mlflow.set_tracking_uri(server.url)
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert_every_epoch_once(run_id, 6)
    assert tracking.MODEL_URI_TAG in run.data.tags and "test_dice_coef" in run.data.metrics
    panels = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert len(panels) == 6  # the epoch-inference picture of each of the 6 epochs, the delayed ones included
    assert not (cfg.output_dir / spool.SPOOL_DIR).exists()  # nothing left pending


def test_server_lost_for_good_then_resume_uploads(server, binary_root, tmp_path):
    out = tmp_path / "out"
    cfg_path = write_yaml(tmp_path / "tiny.yaml", "server-gone", binary_root, out, "train.epochs=4")
    env = venv_env(MLFLOW_TRACKING_URI=server.url, **{spool.WAIT_ENV: "6"})
    proc = subprocess.Popen([sys.executable, "-m", "seg_mlops.cli", "train", "--config", str(cfg_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while epochs_saved(out) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    server.kill()
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "is incomplete" in errors[0] and str(out) in errors[0], log[-3000:]
    run_id = errors[0].split("run ")[1].split()[0]
    assert f"seg-mlops train --resume {run_id}" in errors[0]
    # Nothing is lost: the model, the history and evaluation files, the state and the spool.
    for name in ("best_model.keras", "train_losses.csv", "evaluation.csv", "per_image.csv"):
        assert (out / name).is_file(), name
    state = resume.load_state(out)
    assert state.complete and state.epoch == 4 and state.owner == run_id
    pending = [json.loads(line) for line in (out / spool.SPOOL_DIR / spool.SPOOL_FILE).read_text().splitlines()]
    assert {r["kind"] for r in pending} == {"metrics", "image"}

    # The server is back: the next command marks the orphaned run FAILED; the resume uploads it all.
    server.start()
    resumed = subprocess.run([sys.executable, "-m", "seg_mlops.cli", "train", "--resume", run_id], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert f"run {run_id} was left RUNNING by dead process {proc.pid}" in resumed.stderr
    mlflow.set_tracking_uri(server.url)
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and f"process {proc.pid}" in run.data.tags[lifecycle.ENDED_TAG]
    assert_every_epoch_once(run_id, 4)
    assert tracking.MODEL_URI_TAG in run.data.tags and "best_val_dice_coef" in run.data.metrics
    assert not (out / spool.SPOOL_DIR).exists() and not (out / resume.STATE_DIR).exists()


def test_refused_upload_is_reported_at_once_not_retried(server, tmp_path, monkeypatch, capfd):
    # A deleted run: the server answers every write with a permanent error (400). Waiting the 300 s
    # meant for an outage would not change the answer.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv(spool.WAIT_ENV, "300")
    tracking.use_store()
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("deleted-run")).info.run_id
    client.delete_run(run_id)

    # Per-epoch records, uploaded by the background thread: the next sink call raises.
    sink = spool.RunSink(run_id, tmp_path / "out")
    try:
        sink.log_metrics({"loss": 0.5}, step=0)
        start = time.monotonic()
        with pytest.raises(SegMlopsError) as refused:
            sink.flush(timeout=20)
        assert time.monotonic() - start < 15
        message = str(refused.value)
        assert f"run {run_id}" in message and "log_batch" in message and "\n" not in message, message
        with pytest.raises(SegMlopsError, match=run_id):
            sink.log_metrics({"loss": 0.4}, step=1)  # the training's next epoch stops there
        with pytest.raises(SegMlopsError, match=run_id):
            sink.call("model", lambda: None, deadline=time.monotonic() + 300)
    finally:
        sink.close()

    # An end-of-run upload (sink.call): raised at once, naming the run and the call.
    sink = spool.RunSink(run_id, tmp_path / "out")
    try:
        start = time.monotonic()
        with pytest.raises(SegMlopsError) as refused:
            sink.call("tags", lambda: client.set_tag(run_id, "k", "v"), deadline=time.monotonic() + 300)
        assert time.monotonic() - start < 15
        assert f"run {run_id}" in str(refused.value) and "tags" in str(refused.value)
    finally:
        sink.close()
    err = capfd.readouterr().err
    assert "warning: tracking server" not in err, err[-2000:]  # not mistaken for an outage
    refusals = [line for line in err.splitlines() if f"run {run_id}" in line]
    assert len(refusals) == 1 and refusals[0].startswith(f"error: run {run_id}: "), err[-2000:]  # printed at once


class DeleteRun(keras.callbacks.Callback):
    """Deletes the active run when epoch `at` begins, as a user cleaning up the UI might."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.run_id = at, None

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at:
            self.run_id = mlflow.active_run().info.run_id
            mlflow.MlflowClient().delete_run(self.run_id)


def test_run_deleted_mid_training_stops_it_with_the_refusal(server, tiny_cfg, monkeypatch, capfd):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv(spool.WAIT_ENV, "300")
    cfg = tiny_cfg("experiment=deleted-mid-run", "train.epochs=8")
    deleter = DeleteRun(at=1)
    with pytest.raises(SegMlopsError) as refused:
        tracking.train(cfg, extra_callbacks=[deleter])
    assert str(refused.value).startswith(f"run {deleter.run_id}: tracking server {server.url} refused log_")
    # Epoch 1's records are refused while epoch 2 trains; the next epoch end raises it.
    assert epochs_saved(cfg.output_dir) <= 3
    assert "warning: tracking server" not in capfd.readouterr().err


@pytest.mark.parametrize("exc, transient", [
    # A connection refused after MLflow's own retries: wrapped in a plain MlflowException.
    (mlflow.exceptions.MlflowException(
        "API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed with exception "
        "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url: ..."), True),
    (requests.ConnectionError("refused"), True),
    (requests.Timeout("read timed out"), True),
    (ConnectionRefusedError(111, "refused"), True),
    (urllib3.exceptions.ProtocolError("Connection aborted."), True),
    (RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}), True),
    (RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}), True),
    (RestException({"error_code": "INTERNAL_ERROR", "message": "db locked"}), True),
    (RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "run is deleted"}), False),
    (RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"}), False),
    (RestException({"error_code": "INVALID_STATE", "message": "run is deleted"}), False),  # a 500 in MLflow's map
    (RestException({"error_code": "PERMISSION_DENIED", "message": "no"}), False),
    (http_error(503), True),
    (http_error(429), True),
    (http_error(404), False),
    (ValueError("a bug"), False),
])
def test_transient_errors(exc, transient):
    assert spool.transient(exc) is transient


def test_http_retries_shortened_unless_the_user_set_them(server, monkeypatch, tmp_path):
    """use_store on an http:// URI shortens MLflow's own HTTP retries (README: "shortened to 2"),
    as MLflow itself then reads them; a value the user set is kept."""
    from mlflow import environment_variables as mlflow_env

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    for name in tracking.HTTP_RETRY_DEFAULTS:  # unset here, restored (or unset) after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert tracking.use_store() == server.url
    assert {name: os.environ[name] for name in tracking.HTTP_RETRY_DEFAULTS} == {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    assert (mlflow_env.MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), mlflow_env.MLFLOW_HTTP_REQUEST_TIMEOUT.get()) == (2, 30)

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")  # the user's choice wins
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")
    tracking.use_store()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    assert mlflow_env.MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 5
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"

    # A sqlite store is local: nothing to shorten.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'local.db'}")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    tracking.use_store()
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
