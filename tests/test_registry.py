"""Registry on a real MLflow sqlite store: best-run choice, candidate/champion aliases, the
promotion gate, version tags, reuse of an already registered run, errors, and serving the champion.

Runs are made by hand (a tiny real Keras model logged through tracking.log_model) instead of by
training, so each case costs a model log rather than a fit.
"""

from __future__ import annotations

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from seg_mlops import config, registry, tracking
from seg_mlops.errors import SegMlopsError


@pytest.fixture(scope="module")
def tiny_model() -> keras.Model:
    # Named "image" like model.build_unet's input: the signature tracking.log_model writes names it so.
    inputs = keras.Input((8, 8, 3), name="image")
    return keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs))


@pytest.fixture
def store(tmp_path, monkeypatch) -> MlflowClient:
    """A fresh sqlite store; the cwd moves too, because local artifacts go under ./tracking."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    yield MlflowClient(tracking.tracking_uri())
    mlflow.end_run()  # a failed assertion inside a run must not leak the active run into other tests


@pytest.fixture
def log_run(store, tiny_model):
    """Make a run as tracking.train would leave it; returns its id."""
    def make(experiment: str, metrics: dict[str, float], *, curve: list[float] = (), status: str = "FINISHED",
             model: bool = True) -> str:
        with mlflow.start_run(experiment_id=tracking.connect(experiment)) as run:
            mlflow.log_params({"model.image_height": 8, "model.image_width": 8, "model.num_classes": 1,
                               "data.rgb_map": "[]"})
            mlflow.set_tag("seg_mlops.dataset_fingerprint", "fp123")
            for step, value in enumerate(curve):
                mlflow.log_metric("val_dice_coef", value, step=step)
            mlflow.log_metrics(metrics)
            if model:
                tracking.log_model(tiny_model)
            mlflow.end_run(status)
        return run.info.run_id
    return make


def cfg_for(experiment: str) -> config.Config:
    return config.load(None, [f"experiment={experiment}"])


def test_best_run_uses_best_metric_and_direction(log_run):
    # b has the best best_val_dice_coef although its curve ends lowest (early stopping restored
    # its best epoch); c has the lowest val_loss.
    a = log_run("pick", {"best_val_dice_coef": 0.6, "val_loss": 0.2}, curve=[0.5, 0.6])
    b = log_run("pick", {"best_val_dice_coef": 0.9, "val_loss": 0.5}, curve=[0.9, 0.3])
    c = log_run("pick", {"best_val_dice_coef": 0.7, "val_loss": 0.1}, curve=[0.7, 0.7])
    log_run("pick", {"best_val_dice_coef": 0.99, "val_loss": 0.0}, status="FAILED")
    log_run("pick", {"best_val_dice_coef": 0.98, "val_loss": 0.0}, model=False)
    assert registry.best_run("pick", "val_dice_coef").info.run_id == b
    assert registry.best_run("pick", "val_loss").info.run_id == c
    assert a not in (b, c)


def test_register_promotion_gate(store, log_run):
    cfg = cfg_for("flow")
    name = registry.registered_name("flow")
    assert name == "seg-flow"
    first = log_run("flow", {"best_val_dice_coef": 0.7, "test_dice_coef": 0.5})

    r1 = registry.register_best(cfg)  # the only run: no champion yet, so it becomes one
    assert (r1.name, r1.version, r1.run_id, r1.metric) == (name, 1, first, "val_dice_coef")
    assert r1.value == pytest.approx(0.7) and r1.promoted and r1.previous_champion is None
    assert int(store.get_model_version_by_alias(name, "champion").version) == 1
    assert int(store.get_model_version_by_alias(name, "candidate").version) == 1
    tags = store.get_model_version(name, "1").tags
    assert float(tags["metric_value"]) == pytest.approx(0.7) and tags["run_id"] == first
    assert tags["metric"] == "val_dice_coef" and tags["metric_key"] == "best_val_dice_coef"
    assert (tags["input_size"], tags["classes"], tags["dataset_fingerprint"]) == ("8x8", "1", "fp123")

    worse = log_run("flow", {"best_val_dice_coef": 0.6, "test_dice_coef": 0.9})
    r2 = registry.register_best(cfg, run_id=worse)
    assert (r2.version, r2.promoted) == (2, False) and r2.previous_champion == pytest.approx(0.7)
    assert int(store.get_model_version_by_alias(name, "candidate").version) == 2
    assert int(store.get_model_version_by_alias(name, "champion").version) == 1

    better = log_run("flow", {"best_val_dice_coef": 0.8, "test_dice_coef": 0.4})
    r3 = registry.register_best(cfg)
    assert (r3.version, r3.run_id, r3.promoted) == (3, better, True)
    assert r3.previous_champion == pytest.approx(0.7)
    assert int(store.get_model_version_by_alias(name, "champion").version) == 3

    # Forcing the worse run: its existing version is reused and promoted.
    r4 = registry.register_best(cfg, run_id=worse, force=True)
    assert (r4.version, r4.promoted, r4.reused) == (2, True, True)
    assert r4.previous_champion == pytest.approx(0.8)
    assert int(store.get_model_version_by_alias(name, "champion").version) == 2

    # Another metric: the champion (registered on val_dice_coef) is compared on its run's test_dice_coef.
    r5 = registry.register_best(cfg, metric="test_dice_coef")
    assert (r5.version, r5.run_id, r5.reused, r5.promoted) == (2, worse, True, True)
    assert r5.previous_champion == pytest.approx(0.9)

    # Registering the same best run twice makes no new version.
    again = registry.register_best(cfg)
    assert (again.version, again.reused) == (3, True) and again.promoted
    assert len(store.search_model_versions(f"name = '{name}'")) == 3

    served = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    batch = np.random.default_rng(0).uniform(0, 255, (1, 8, 8, 3)).astype("float32")
    assert np.asarray(served.predict(batch)).shape == (1, 8, 8, 1)


def test_errors(store, log_run, tmp_path, monkeypatch):
    with monkeypatch.context() as env:  # a store that was never created is not created by asking
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/absent/mlflow.db")
        with pytest.raises(SegMlopsError, match="no tracking store .*absent.*train first"):
            registry.best_run("nowhere", "val_dice_coef")
    assert not (tmp_path / "absent").exists()
    log_run("failed", {"best_val_dice_coef": 0.9}, status="FAILED")
    with pytest.raises(SegMlopsError, match="experiment 'nowhere' not found.*train"):
        registry.register_best(cfg_for("nowhere"))
    with pytest.raises(SegMlopsError, match="'failed' has no FINISHED run with a logged model"):
        registry.register_best(cfg_for("failed"))
    log_run("ok", {"best_val_dice_coef": 0.9, "test_iou_coef": 0.5})
    with pytest.raises(SegMlopsError, match="no run .* has metric 'val_iou'.*best_val_dice_coef, test_iou_coef"):
        registry.best_run("ok", "val_iou")
    with pytest.raises(SegMlopsError, match="run nope not found"):
        registry.register_best(cfg_for("ok"), run_id="nope")
