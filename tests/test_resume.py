"""Resume: a training killed with SIGKILL mid-epoch continues in the same MLflow run, with the same
number of epochs, every epoch's metrics exactly once, and the killed run never left RUNNING."""

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
import numpy as np
import pytest
import yaml

from seg_mlops import config, lifecycle, resume, synthetic, tracking
from seg_mlops import train as train_mod
from seg_mlops.errors import SegMlopsError
from tests.conftest import TINY
from tests.test_mlflow import venv_env

EPOCHS = 6


@pytest.fixture(scope="module")
def slow_root(tmp_path_factory) -> Path:
    # 48 training images at batch 2: 24 steps per epoch, so a kill lands inside an epoch.
    return synthetic.make_dataset(tmp_path_factory.mktemp("resume-data"), classes=1, size=32, counts=(48, 4, 4))


def write_yaml(path: Path, experiment: str, root: Path, out: Path, *extra: str) -> Path:
    flat = config.parse_overrides([*TINY, f"data.root={root}", f"train.output_dir={out}", *extra])
    nested: dict = {"experiment": experiment}
    for key, value in flat.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    path.write_text(yaml.safe_dump(nested))
    return path


def cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "seg_mlops.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def epochs_saved(out: Path) -> int:
    try:
        return json.loads((out / resume.STATE_DIR / resume.STATE_FILE).read_text())["epoch"]
    except (OSError, ValueError):
        return 0


def test_sigkill_mid_epoch_then_resume(slow_root, tmp_path, tracking_store):
    out = tmp_path / "out"
    cfg_path = write_yaml(tmp_path / "tiny.yaml", "resume-kill", slow_root, out, f"train.epochs={EPOCHS}",
                          "train.batch_size=2", "train.reducer_patience=1", "train.reducer_factor=0.5")
    env = venv_env(MLFLOW_TRACKING_URI=tracking_store)
    proc = cli("train", "--config", str(cfg_path), env=env)
    deadline = time.time() + 300
    while epochs_saved(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # Two epochs saved and the process still training: kill it at once, at the end of the second
    # epoch or inside the third (24 steps); either way that epoch is redone on resume.
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = epochs_saved(out)
    assert 2 <= killed_at < EPOCHS

    mlflow.set_tracking_uri(tracking_store)
    client = mlflow.MlflowClient()
    run = mlflow.search_runs(experiment_names=["resume-kill"], output_format="list")[0]
    run_id = run.info.run_id
    assert run.info.status == "RUNNING"  # nobody could tell the server yet
    assert run.data.tags[lifecycle.PID_TAG] == str(proc.pid)
    # The next command touching the store marks the dead process's run FAILED, saying why.
    tracking.use_store()
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert f"process {proc.pid}" in run.data.tags[lifecycle.ENDED_TAG]

    resumed = cli("train", "--resume", run_id, env=env)
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log[-3000:]
    assert f"resuming from epoch {killed_at + 1} of {EPOCHS}" in log

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[lifecycle.RESUMES_TAG] == "1"
    assert run.data.tags[lifecycle.PID_TAG] == str(resumed.pid)
    assert len(mlflow.search_runs(experiment_names=["resume-kill"], output_format="list")) == 1
    for name in ("loss", "val_loss", "val_dice_coef", "lr", "epoch_seconds"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, name))
        assert steps == list(range(EPOCHS)), name  # no gap, no duplicate
    history = client.get_metric_history(run_id, "val_dice_coef")
    assert run.data.metrics["best_val_dice_coef"] == pytest.approx(max(m.value for m in history))
    assert tracking.MODEL_URI_TAG in run.data.tags and "test_dice_coef" in run.data.metrics
    # The history files span both segments; the resume state is gone once the run is FINISHED.
    rows = (out / "train_losses.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", *map(str, range(EPOCHS))]
    assert not (out / resume.STATE_DIR).exists()
    # The LR the reducer set is continuous: each epoch's lr is the previous one or half of it.
    lrs = [m.value for m in sorted(client.get_metric_history(run_id, "lr"), key=lambda m: m.step)]
    assert all(b == pytest.approx(a) or b == pytest.approx(a / 2) for a, b in zip(lrs, lrs[1:]))

    # Resuming a FINISHED run is an error naming it.
    again = cli("train", "--resume", run_id, env=env)
    text, _ = again.communicate(timeout=300)
    assert again.returncode == 1 and f"Error: run {run_id} is FINISHED: nothing to resume" in text


class Stop(keras.callbacks.Callback):
    """Interrupts fit at the end of epoch `at` (after the state of that epoch was saved)."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            raise KeyboardInterrupt


class Probe(keras.callbacks.Callback):
    """Records the optimizer's state when fit begins."""

    def on_train_begin(self, logs=None):
        self.iterations = int(self.model.optimizer.iterations)
        self.lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


def test_resume_restores_optimizer_lr_and_callback_state(tiny_cfg):
    # 8 training images at batch 4: 2 optimizer steps per epoch.
    cfg = tiny_cfg("train.epochs=4", "train.reducer_patience=1", "train.reducer_factor=0.5", "train.patience=3")
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg, extra_callbacks=[Stop(at=1)], owner="run-a")
    state = resume.load_state(cfg.output_dir)
    assert (state.epoch, state.complete, state.owner, len(state.rows)) == (2, False, "run-a", 2)
    # Epoch 2's weights and optimizer state: a hard link to the best checkpoint when that epoch
    # saved it (val_dice_coef above epoch 1's), else written by Keras' save_weights.
    improved_at_2 = state.rows[1]["val_dice_coef"] > state.rows[0]["val_dice_coef"]
    assert sorted(p.name for p in (cfg.output_dir / resume.STATE_DIR).iterdir()) == [
        "epoch_0002.keras" if improved_at_2 else "epoch_0002.weights.h5", "state.json"]
    best = max(r["val_dice_coef"] for r in state.rows)
    assert state.callbacks["ModelCheckpoint"]["best"] == pytest.approx(best)
    assert state.callbacks["EarlyStopping"]["best"] == pytest.approx(best)

    with pytest.raises(SegMlopsError, match="holds the training state of run run-a, not run-b"):
        train_mod.train(cfg, resume=True, owner="run-b")
    probe = Probe()
    result = train_mod.train(cfg, resume=True, owner="run-a", extra_callbacks=[probe])
    assert probe.iterations == 2 * 2  # Adam's step count came back with the weights
    # The LR the reducer had set: epoch 1 ran with rows[-1]["lr"]; the reducer (patience 1, factor
    # 0.5, Keras' min_delta 1e-4) halved it after epoch 1 unless val_dice_coef improved on epoch 0.
    improved = state.rows[1]["val_dice_coef"] - 1e-4 > state.rows[0]["val_dice_coef"]
    assert probe.lr == pytest.approx(state.rows[-1]["lr"] * (1.0 if improved else 0.5))
    assert result.history["lr"][2] == pytest.approx(probe.lr)  # the resumed epoch ran with it
    assert len(result.history["loss"]) == 4 and result.history["loss"][:2] == [r["loss"] for r in state.rows]
    # The best checkpoint is the best of both segments.
    final = resume.load_state(cfg.output_dir)
    assert final.complete and final.callbacks["ModelCheckpoint"]["best"] == pytest.approx(
        max(result.history["val_dice_coef"]))

    # A fresh (overwriting) training drops the old state instead of resuming it.
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg, overwrite=True, extra_callbacks=[Stop(at=0)], owner="run-c")
    assert (resume.load_state(cfg.output_dir).owner, resume.load_state(cfg.output_dir).epoch) == ("run-c", 1)


def test_state_links_the_checkpoint_its_epoch_saved(tiny_cfg):
    # Epoch 1 always saves the best checkpoint (nothing to beat yet): the state's weights are that
    # very file (hard-linked, not written twice), and resuming from it restores the optimizer.
    cfg = tiny_cfg("train.epochs=2")
    out = cfg.output_dir
    out.mkdir(parents=True)
    # A checkpoint save that a kill cut short is dropped, never promoted to best_model.keras.
    resume.saving_path(out / train_mod.MODEL_FILE).write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg, extra_callbacks=[Stop(at=0)], owner="run-a")
    state = resume.load_state(out)
    assert (state.epoch, state.weights) == (1, "epoch_0001.keras")
    linked = out / resume.STATE_DIR / state.weights
    assert os.path.samefile(linked, out / train_mod.MODEL_FILE)
    assert not resume.saving_path(out / train_mod.MODEL_FILE).exists()
    first = keras.saving.load_model(linked, compile=False).get_weights()

    probe = Probe()
    result = train_mod.train(cfg, resume=True, owner="run-a", extra_callbacks=[probe])
    assert probe.iterations == 2  # 8 images at batch 4: epoch 1's two Adam steps came back
    assert len(result.history["loss"]) == 2
    # Epoch 2's checkpoint is a new file: the copy linked at epoch 1 kept epoch 1's weights.
    final = resume.load_state(out)
    assert final.complete and final.epoch == 2 and not linked.exists()
    if final.weights.endswith(".keras"):
        assert os.path.samefile(out / resume.STATE_DIR / final.weights, out / train_mod.MODEL_FILE)
    best = keras.saving.load_model(out / train_mod.MODEL_FILE, compile=False).get_weights()
    improved = result.history["val_dice_coef"][1] > result.history["val_dice_coef"][0]
    assert improved == any(not np.array_equal(a, b) for a, b in zip(first, best))


def test_resume_refuses_a_config_that_differs(tiny_cfg):
    cfg = tiny_cfg("experiment=resume-mismatch", "train.epochs=2")
    with pytest.raises(KeyboardInterrupt):
        tracking.train(cfg, extra_callbacks=[Stop(at=0)])
    run = mlflow.search_runs(experiment_names=["resume-mismatch"], output_format="list")[0]
    assert run.info.status == "KILLED"
    other = config.override(cfg, {"model.base_filters": 8})
    with pytest.raises(SegMlopsError, match=r"another config \(model.base_filters: run '4', config '8'\)"):
        tracking.resume_config(run.info.run_id, other)
    with pytest.raises(SegMlopsError, match="run nosuchrun not found"):
        tracking.resume_config("nosuchrun")
    # Without a config, the run's own (config.yaml in its output folder) is used.
    own = tracking.resume_config(run.info.run_id)
    assert own.model.base_filters == 4 and Path(own.train.output_dir) == cfg.output_dir.resolve()
    result, run_id = tracking.train(own, resume_run_id=run.info.run_id)
    assert run_id == run.info.run_id and len(result.history["loss"]) == 2
    client = mlflow.MlflowClient()
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [0, 1]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_mlflow_run_entry_point_resumes_into_the_interrupted_run(tiny_cfg, tmp_path, tracking_store):
    """`mlflow run . -e train -P resume=<id>`: training continues in the interrupted run (steps
    0..N-1 once each); MLflow's own new run only points at it."""
    from tests.test_mlflow import MLFLOW, REPO

    cfg = tiny_cfg("experiment=resume-mlproject", "train.epochs=3")
    with pytest.raises(KeyboardInterrupt):
        tracking.train(cfg, extra_callbacks=[Stop(at=0)])
    killed = mlflow.search_runs(experiment_names=["resume-mlproject"], output_format="list")[0]
    assert killed.info.status == "KILLED"
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml(cfg))
    proc = subprocess.run([MLFLOW, "run", str(REPO), "-e", "train", "-P", f"config={path}",
                           "-P", f"resume={killed.info.run_id}", "--env-manager", "local",
                           "--experiment-name", "resume-mlproject"],
                          env=venv_env(MLFLOW_TRACKING_URI=tracking_store), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(tracking_store)
    client = mlflow.MlflowClient()
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED"
    for name in ("loss", "val_loss", "lr"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == [0, 1, 2], name
    assert tracking.MODEL_URI_TAG in run.data.tags
    others = [r for r in mlflow.search_runs(experiment_names=["resume-mlproject"], output_format="list")
              if r.info.run_id != killed.info.run_id]
    assert len(others) == 1 and others[0].data.tags[lifecycle.RESUMED_RUN_TAG] == killed.info.run_id


def test_resume_refused_for_a_live_process_or_another_host(tiny_cfg, tmp_path):
    """A RUNNING run whose process is alive (another process of this host) or that belongs to
    another host cannot be resumed; once its process is dead, the run is marked FAILED and the
    same resume is accepted."""
    import socket

    cfg = tiny_cfg("experiment=resume-owners")
    experiment_id = tracking.connect(cfg.experiment)
    client = mlflow.MlflowClient()
    out = str(tmp_path / "owned")
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        alive = client.create_run(experiment_id, tags={
            lifecycle.OUTPUT_TAG: out, lifecycle.HOST_TAG: socket.gethostname(),
            lifecycle.PID_TAG: str(owner.pid), lifecycle.PID_START_TAG: lifecycle._start_time(owner.pid)})
        elsewhere = client.create_run(experiment_id, tags={
            lifecycle.OUTPUT_TAG: out, lifecycle.HOST_TAG: "other-host.invalid", lifecycle.PID_TAG: "1"})
        run_id = alive.info.run_id
        with pytest.raises(SegMlopsError, match=f"run {run_id} is still RUNNING in process {owner.pid} on "
                                                f"{socket.gethostname()}: stop it before resuming"):
            tracking.resume_config(run_id, cfg)
        assert client.get_run(run_id).info.status == "RUNNING"  # alive: nobody marked it
    finally:
        owner.kill()
        owner.wait(timeout=30)
    other = elsewhere.info.run_id
    with pytest.raises(SegMlopsError, match=f"run {other} trained on host other-host.invalid \\(its state is in "
                                            f"{out} there\\): resume it on that host"):
        tracking.resume_config(other, cfg)
    assert client.get_run(other).info.status == "RUNNING"  # another host's process is not ours to judge
    # The owner is gone: opening the store marks the run FAILED, and resuming it is accepted.
    resumed = tracking.resume_config(run_id, cfg)
    assert Path(resumed.train.output_dir) == Path(out)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and f"process {owner.pid} on" in run.data.tags[lifecycle.ENDED_TAG]
    client.set_terminated(other, "KILLED")  # leave no RUNNING run behind
