"""Real MLflow, no mocks: `mlflow run` of the train entry point, a real `mlflow server` on a free
loopback port, `mlflow models serve` answering HTTP, and runs that fail or are interrupted."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image

from seg_mlops import config, tracking
from tests.conftest import REPO, TINY

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def venv_env(**extra: str) -> dict[str, str]:
    """The environment of a user with this venv activated (mlflow run and serve call `python`
    and `uvicorn` through PATH)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds}s")


@contextmanager
def serve(args: list[str], url: str, env: dict[str, str]):
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_http(url, proc)
        yield proc
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.fixture
def tiny_yaml(binary_root, tmp_path) -> Path:
    flat = config.parse_overrides(TINY + [f"data.root={binary_root}", f"train.output_dir={tmp_path / 'out'}"])
    nested: dict = {"experiment": "tiny-mlproject"}
    for key, value in flat.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(nested))
    return path


def check_training_run(run_id: str, epochs: int) -> None:
    """What a user browsing the run in the UI must find."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # No config params (MLflow's image cards would print them above the epoch picture): the
    # compared keys are tags, the whole config is config.yaml, found again by its hash.
    assert not [k for k in run.data.params if k.startswith(("model.", "train.", "data."))]
    assert run.data.tags["model.base_filters"] == "4" and run.data.tags["model.num_layers"] == "3"
    logged = client.download_artifacts(run_id, "config.yaml")
    assert yaml.safe_load(Path(logged).read_text())["train"]["monitor"] == "val_dice_coef"
    assert run.data.tags[tracking.CONFIG_HASH_TAG] == tracking.config_hash(config.load(logged))
    for name in ("loss", "val_loss", "val_dice_coef", "lr", "epoch_seconds"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == list(range(epochs)), name
    assert "test_dice_coef" in run.data.metrics and "best_val_dice_coef" in run.data.metrics
    assert len(run.data.tags["seg_mlops.dataset_fingerprint"]) == 16
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "evaluation.csv", "per_image.csv", "train_losses.csv", "train_metrics.png"} <= artifacts
    # One decodable picture per epoch, under epoch_infer/input-truth-prediction with its step: the
    # two fixed images' input | truth | prediction panels (3 x 32 px + 2 gaps each) side by side (3:1).
    pngs = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert sorted(p.split("~")[1].split("+step+")[0] + f"@{p.split('+step+')[1].split('+')[0]}"
                  for p in pngs) == [f"input-truth-prediction@{e}" for e in range(epochs)]
    local = client.download_artifacts(run_id, pngs[0])
    assert Image.open(local).size == (2 * (3 * 32 + 4) + 4, 32)
    # The logged model: pyfunc, raw pixels in, masks out, no seg_mlops code needed.
    model = mlflow.pyfunc.load_model(run.data.tags[tracking.MODEL_URI_TAG])
    out = model.predict(np.full((2, 32, 32, 3), 128, np.float32))
    assert np.asarray(out).shape == (2, 32, 32, 1)
    check_run_page(run, epochs)


def check_run_page(run, epochs: int) -> None:
    """What the run shows at a glance in the UI: its experiment's kind, datasets, description,
    the per-image review and the test metrics on the logged model (binary_root: 8/4/4 images)."""
    client = mlflow.MlflowClient()
    run_id, experiment = run.info.run_id, client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # Datasets: one input per split, named, digested by our per-split fingerprint, profiled.
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == sorted(f"{experiment.name}-{s}" for s in ("train", "valid", "test"))
    contexts = {name.rsplit("-", 1)[1]: {t.key: t.value for t in i.tags}["mlflow.data.context"]
                for name, i in inputs.items()}
    assert contexts == {"train": "training", "valid": "validation", "test": "testing"}
    profiles = {name.rsplit("-", 1)[1]: json.loads(i.dataset.profile) for name, i in inputs.items()}
    assert {s: p["images"] for s, p in profiles.items()} == {"train": 8, "valid": 4, "test": 4}
    assert all(sum(p["class_fractions"].values()) == pytest.approx(1, abs=1e-5) for p in profiles.values())
    assert all(0 < p["class_fractions"]["foreground"] < 0.5 for p in profiles.values())
    digests = [i.dataset.digest for i in inputs.values()]
    assert len(set(digests)) == 3 and all(len(d) == 16 for d in digests)
    # The description: one line, what was trained on what and how well.
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("UNet (binary, 4 base filters) trained on ") and "\n" not in note
    assert "8 train / 4 valid / 4 test images, 32x32 px" in note and f"for {epochs} epochs" in note
    # Per-image review: every test image, worst dice first (empty truth last), as per_image.csv
    # scores them, each with its input | truth | prediction thumbnail.
    table = client.load_table(experiment.experiment_id, "per_image_review.json", run_ids=[run_id])
    csv_rows = {r["image"]: r for r in _csv(client.download_artifacts(run_id, "per_image.csv"))}
    assert sorted(table["image"]) == sorted(csv_rows)
    dice = [d for d in table["dice"] if d == d]
    assert dice == sorted(dice)
    assert dice == pytest.approx([float(csv_rows[n]["dice"]) for n in table["image"][:len(dice)]], abs=1e-9)
    thumbs = table["input | truth | prediction"]
    assert all(t["type"] == "image" for t in thumbs)
    assert Image.open(client.download_artifacts(run_id, thumbs[0]["filepath"])).size == (3 * 32 + 4, 32)
    worst = sorted(a.path for a in client.list_artifacts(run_id, "worst_test_images"))
    assert worst == [f"worst_test_images/{i + 1:02d}_{Path(n).stem}.png"
                     for i, n in enumerate(table["image"][:min(5, len(dice))])]
    # The test metrics belong to the logged model too, measured on the test split's dataset.
    model_id = run.data.tags[tracking.MODEL_URI_TAG].removeprefix("models:/")
    on_model = {m.key: m for m in mlflow.get_logged_model(model_id).metrics}
    assert on_model["test_dice_coef"].value == run.data.metrics["test_dice_coef"]
    assert on_model["test_dice_coef"].dataset_name == f"{experiment.name}-test"


def _csv(path: str) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_mlflow_run_train_entry_point(tiny_yaml, tracking_store):
    # `mlflow run --experiment-name` would create a missing experiment with artifacts in ./mlruns;
    # ours keep them beside the store.
    tracking.connect("tiny-mlproject")
    env = venv_env(MLFLOW_TRACKING_URI=tracking_store)
    proc = subprocess.run([MLFLOW, "run", str(REPO), "-e", "train", "-P", f"config={tiny_yaml}",
                           "-P", "set=train.epochs=3 train.learning_rate=0.02", "--env-manager", "local",
                           "--experiment-name", "tiny-mlproject"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(tracking_store)
    runs = mlflow.search_runs(experiment_names=["tiny-mlproject"], output_format="list")
    assert len(runs) == 1
    # Entry-point params (config, set) live beside our config tags without conflict.
    # (mlflow logs the shell-quoted value of string params)
    assert runs[0].data.params["set"].strip("'") == "train.epochs=3 train.learning_rate=0.02"
    assert tracking.run_values(runs[0])["train.learning_rate"] == "0.02"
    check_training_run(runs[0].info.run_id, epochs=3)


def test_training_against_a_real_tracking_server(tiny_cfg, tmp_path, monkeypatch):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = f"sqlite:///{tmp_path / 'server.db'}"
    args = [MLFLOW, "server", "--backend-store-uri", store, "--artifacts-destination",
            str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    with serve(args, url + "/health", venv_env()):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        _, run_id = tracking.train(tiny_cfg("experiment=via-server"))
        mlflow.set_tracking_uri(url)
        check_training_run(run_id, epochs=2)
    # Proxied artifacts: the files went to the server's destination, not our machine's tracking/.
    assert list((tmp_path / "server-artifacts").rglob("evaluation.csv"))


def test_unreachable_server_is_one_clear_error(tiny_cfg, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    from seg_mlops.errors import SegMlopsError

    with pytest.raises(SegMlopsError, match=f"tracking server {url} is unreachable"):
        tracking.train(tiny_cfg())


class Boom(keras.callbacks.Callback):
    def __init__(self, exc: BaseException):
        super().__init__()
        self.exc = exc

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise self.exc


@pytest.mark.parametrize("exc, status", [(RuntimeError("disk full"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_crash_ends_the_run_and_keeps_the_checkpoint(tiny_cfg, exc, status):
    cfg = tiny_cfg("train.epochs=3", f"experiment=crash-{status.lower()}")
    with pytest.raises(type(exc)):
        tracking.train(cfg, extra_callbacks=[Boom(exc)])
    run = mlflow.search_runs(experiment_names=[cfg.experiment], output_format="list")[0]
    assert run.info.status == status
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")] == [0, 1]
    assert (cfg.output_dir / "best_model.keras").exists()


def test_raw_network_is_still_logged_and_served(tiny_cfg):
    """Beside the registered pipeline (tests/test_serving.py), each run logs the raw Keras network:
    float32 tensors of the model's size in, probabilities out, served as it is."""
    cfg = tiny_cfg("experiment=served", "train.epochs=1")
    trained, run_id = tracking.train(cfg)
    raw_uri = mlflow.get_run(run_id).data.tags[tracking.MODEL_URI_TAG]

    port = free_port()
    env = venv_env(MLFLOW_TRACKING_URI=tracking.tracking_uri())
    args = [MLFLOW, "models", "serve", "-m", raw_uri, "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(port)]
    with serve(args, f"http://127.0.0.1:{port}/ping", env):
        batch = np.full((1, 32, 32, 3), 200, np.uint8).tolist()  # JSON ints, as raw pixels are
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": batch}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = np.asarray(json.loads(response.read())["predictions"])
    assert predictions.shape == (1, 32, 32, 1)
    # the served network is the trained model: same probabilities as it gives here
    expected = trained.model.predict(np.full((1, 32, 32, 3), 200, np.float32), verbose=0)
    np.testing.assert_allclose(predictions, expected, rtol=1e-4, atol=1e-6)


def test_main_entry_point_runs_the_demo_pipeline(tmp_path, tracking_store):
    tracking.connect("demo")
    overrides = (f"data.root={tmp_path / 'demo-data'} train.output_dir={tmp_path / 'out'} train.epochs=2 "
                 "model.image_height=32 model.image_width=32 model.num_layers=3 model.base_filters=4")
    proc = subprocess.run([MLFLOW, "run", str(REPO), "-P", f"set={overrides}", "--env-manager", "local",
                           "--experiment-name", "demo"],
                          env=venv_env(MLFLOW_TRACKING_URI=tracking_store), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "demo-data" / "train" / "images").glob("*.png"))) == 64
    assert len(list((tmp_path / "out" / "infer").glob("*.png"))) == 16
    mlflow.set_tracking_uri(tracking_store)
    champion = mlflow.MlflowClient().get_model_version_by_alias("seg-demo", "champion")
    run = mlflow.get_run(champion.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["train.epochs"] == "2"


def test_ui_serves_the_project_store_on_loopback(tmp_path):
    store = f"sqlite:///{tmp_path / 'ui' / 'mlflow.db'}"
    env = venv_env(MLFLOW_TRACKING_URI=store)
    subprocess.run([sys.executable, "-c", "from seg_mlops import tracking; tracking.connect('seen-in-ui')"],
                   env=env, check=True, capture_output=True)
    port = free_port()
    args = [sys.executable, "-m", "seg_mlops.cli", "ui", "--port", str(port)]
    with serve(args, f"http://127.0.0.1:{port}/health", env):
        query = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                                       data=json.dumps({"max_results": 10}).encode(),
                                       headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(query, timeout=30) as response:
            names = {e["name"] for e in json.loads(response.read())["experiments"]}
    assert "seen-in-ui" in names
