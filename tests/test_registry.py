"""Registry on a real MLflow sqlite store: best-run choice, candidate/champion aliases, the
promotion gate (paired per-image test comparison), version tags and model card, reuse of an
already registered run, refusal of other data, errors, and serving the champion.

Runs are made by hand (tiny real Keras models logged through tracking.log_model) instead of by
training, so each case costs a model log rather than a fit; their models predict foreground
everywhere or nowhere, so their per-image test dice on the synthetic data is known by hand.
"""

from __future__ import annotations

import dataclasses

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from seg_mlops import compare, config, data, registry, tracking
from seg_mlops.errors import SegMlopsError


def constant_model(logit: float) -> keras.Model:
    """An 8 px network whose every pixel gets sigmoid(logit): +10 predicts foreground everywhere,
    -10 background everywhere, so its per-image test dice is known by hand. Named "image" like
    model.build_unet's input: the signature tracking.log_model writes names it so."""
    inputs = keras.Input((8, 8, 3), name="image")
    return keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer="zeros",
                                                   bias_initializer=keras.initializers.Constant(logit))(inputs))


@pytest.fixture(scope="module")
def models() -> dict[str, keras.Model]:
    return {"everything": constant_model(10.0), "nothing": constant_model(-10.0)}


@pytest.fixture
def store(tmp_path, monkeypatch) -> MlflowClient:
    """A fresh sqlite store; the cwd moves too, because local artifacts go under ./tracking."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    yield MlflowClient(tracking.tracking_uri())
    mlflow.end_run()  # a failed assertion inside a run must not leak the active run into other tests


@pytest.fixture
def log_run(store, models, binary_root):
    """Make a run as tracking.train would leave it (trained on binary_root unless `fingerprint`
    says otherwise); `model` names one of `models`. Returns its id."""
    def make(experiment: str, metrics: dict[str, float], *, curve: list[float] = (), status: str = "FINISHED",
             model: str | None = "everything", fingerprint: str | None = None) -> str:
        with mlflow.start_run(experiment_id=tracking.connect(experiment)) as run:
            mlflow.log_params({"model.image_height": 8, "model.image_width": 8, "model.num_classes": 1,
                               "data.rgb_map": "[]"})
            mlflow.set_tag("seg_mlops.dataset_fingerprint", fingerprint or data.fingerprint(cfg_for(experiment, binary_root)))
            for step, value in enumerate(curve):
                mlflow.log_metric("val_dice_coef", value, step=step)
            mlflow.log_metrics(metrics)
            if model:
                tracking.log_model(models[model])
            mlflow.end_run(status)
        return run.info.run_id
    return make


def cfg_for(experiment: str, root="") -> config.Config:
    return config.load(None, [f"experiment={experiment}", f"data.root={root}", "data.binary_mask=threshold",
                              "gate.resamples=2000"])


def everything_dice(cfg: config.Config) -> np.ndarray:
    """Per-image dice of predicting foreground everywhere at 8x8: 2T/(T + 64), T the image's
    foreground pixels (its mask resized to 8x8 by the data code)."""
    small = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_height=8, image_width=8))
    truth = np.array([(data.load_pair(pair, small)[1] == 1).sum() for pair in data.split_pairs(cfg, "test")])
    assert truth.all()  # every synthetic test image has foreground: none is skipped
    return 2 * truth / (truth + 64)


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


def test_register_promotion_gate(store, log_run, binary_root):
    cfg = cfg_for("flow", binary_root)
    name = registry.registered_name("flow")
    assert name == "seg-flow"
    expected = everything_dice(cfg)
    # The best run on validation predicts nothing: the validation metric picks the candidate, the
    # test comparison decides promotion.
    nothing = log_run("flow", {"best_val_dice_coef": 0.9, "test_dice_coef": 0.5}, model="nothing")

    r1 = registry.register_best(cfg)  # the only run: no champion yet, so it becomes one, uncompared
    assert (r1.name, r1.version, r1.run_id, r1.metric, r1.decision) == (name, 1, nothing, "val_dice_coef", "first")
    assert r1.value == pytest.approx(0.9) and r1.promoted and r1.previous_champion is None and r1.comparison is None
    assert int(store.get_model_version_by_alias(name, "champion").version) == 1
    assert int(store.get_model_version_by_alias(name, "candidate").version) == 1
    tags = store.get_model_version(name, "1").tags
    assert float(tags["metric_value"]) == pytest.approx(0.9) and tags["run_id"] == nothing
    assert tags["metric"] == "val_dice_coef" and tags["metric_key"] == "best_val_dice_coef"
    assert (tags["input_size"], tags["classes"]) == ("8x8", "1")
    assert tags["dataset_fingerprint"] == data.fingerprint(cfg)
    assert (tags["gate_decision"], tags["gate_reason"]) == ("first", "first version: no champion to compare with")

    # Worse on validation, better on every test image: promoted, with the hand-computed numbers.
    everything = log_run("flow", {"best_val_dice_coef": 0.6, "test_dice_coef": 0.9})
    r2 = registry.register_best(cfg, run_id=everything)
    assert (r2.version, r2.promoted, r2.decision) == (2, True, "promoted")
    assert r2.previous_champion == pytest.approx(0.9)
    s = r2.comparison.stats
    assert (s.n, s.skipped, s.mean_a) == (4, 0, 0.0)
    assert (s.mean_b, s.difference) == pytest.approx((expected.mean(), expected.mean()))
    # every difference is positive, so every bootstrap mean lies between the smallest and largest
    assert expected.min() - 1e-12 <= s.ci_low <= s.ci_high <= expected.max() + 1e-12
    assert int(store.get_model_version_by_alias(name, "champion").version) == 2
    tags = store.get_model_version(name, "2").tags
    assert (tags["gate_decision"], tags["compared_with"], tags["gate_n"], tags["gate_skipped"]) == ("promoted", "1", "4", "0")
    assert float(tags["gate_difference"]) == pytest.approx(expected.mean())
    assert (float(tags["gate_ci_low"]), float(tags["gate_ci_high"])) == (s.ci_low, s.ci_high)
    assert tags["gate_reason"].startswith("significantly better than champion version 1: mean per-image test dice")
    card = store.get_model_version(name, "2").description
    assert "## Promotion" in card and f"| difference (this - champion) | | {expected.mean():+.4f} |" in card

    # An identical-weights copy, best on validation: difference exactly 0, so it stays candidate.
    copy = log_run("flow", {"best_val_dice_coef": 0.95, "test_dice_coef": 0.9})
    r3 = registry.register_best(cfg)
    assert (r3.version, r3.run_id, r3.promoted, r3.decision) == (3, copy, False, "candidate")
    s = r3.comparison.stats
    assert (s.difference, s.ci_low, s.ci_high, s.p_value, s.n) == (0.0, 0.0, 0.0, 1.0, 4)
    assert int(store.get_model_version_by_alias(name, "candidate").version) == 3
    assert int(store.get_model_version_by_alias(name, "champion").version) == 2
    version = store.get_model_version(name, "3")
    assert (version.tags["gate_decision"], version.tags["gate_difference"]) == ("candidate", "0.0")
    assert version.tags["gate_reason"].startswith("stays candidate: not significantly better than champion version 2")
    assert "| 95% bootstrap interval | | [+0.0000, +0.0000] |" in version.description

    # The model predicting nothing again (its version is reused): clearly worse, not promoted.
    r4 = registry.register_best(cfg, run_id=nothing)
    assert (r4.version, r4.reused, r4.promoted, r4.decision) == (1, True, False, "candidate")
    assert r4.comparison.stats.a_better
    # Forced: champion anyway, the numbers recorded.
    r5 = registry.register_best(cfg, run_id=nothing, force=True)
    assert (r5.version, r5.promoted, r5.decision) == (1, True, "forced")
    assert int(store.get_model_version_by_alias(name, "champion").version) == 1
    assert float(store.get_model_version(name, "1").tags["gate_difference"]) == pytest.approx(-expected.mean())
    # Registering the champion's run again: no new version, no comparison, its gate tags kept.
    again = registry.register_best(cfg, run_id=nothing)
    assert (again.version, again.reused, again.promoted, again.decision) == (1, True, True, "already-champion")
    assert store.get_model_version(name, "1").tags["gate_decision"] == "forced"
    assert len(store.search_model_versions(f"name = '{name}'")) == 3

    served = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    batch = np.random.default_rng(0).uniform(0, 255, (1, 8, 8, 3)).astype("float32")
    assert np.asarray(served.predict(batch)).shape == (1, 8, 8, 1)


def test_other_data_is_refused_unless_forced(store, log_run, binary_root):
    cfg = cfg_for("fp", binary_root)
    name = registry.registered_name("fp")
    log_run("fp", {"best_val_dice_coef": 0.5}, model="nothing")
    registry.register_best(cfg)
    other = log_run("fp", {"best_val_dice_coef": 0.6}, fingerprint="0123456789abcdef")
    with pytest.raises(compare.NotComparable) as refused:
        registry.register_best(cfg, run_id=other)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"not compared: A (models:/{name}/1 (run ")
    assert message.endswith(f"was trained on dataset fingerprint {data.fingerprint(cfg)}, "
                            f"B ({other}) on 0123456789abcdef (pass --force to compare anyway)")
    assert len(store.search_model_versions(f"name = '{name}'")) == 1  # nothing registered

    forced = registry.register_best(cfg, run_id=other, force=True)
    assert (forced.version, forced.promoted, forced.decision) == (2, True, "promoted")  # compared anyway: better
    assert forced.comparison.notes[0].startswith("forced: A (models:/seg-fp/1")


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
