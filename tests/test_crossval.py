"""K-fold cross-validation, real (MLflow sqlite store, tiny models): fold assignment, fold splits,
the fold ensemble, the parent/child runs, and a relaunch after an interruption."""

from __future__ import annotations

import csv

import keras
import mlflow
import numpy as np
import pytest
from click.testing import CliRunner

from seg_mlops import config, crossval, data, lifecycle, registry, tracking
from seg_mlops.cli import cli
from seg_mlops.errors import SegMlopsError
from seg_mlops.infer import load_model
from seg_mlops.model import average_models, build_unet
from seg_mlops.train import MODEL_FILE


def test_fold_assignment_is_seeded_whole_groups_and_balanced():
    # Groups a (3 files), b (2), c (1): placed largest first into the emptiest fold, whatever the
    # seed: a -> 0, b -> 1, c -> 1 (fold 1 holds 2 < 3).
    stems = ["a_1", "a_2", "a_3", "b_1", "b_2", "c_1"]
    for seed in range(5):
        assert data.assign_folds(stems, 2, r"^(.)_", seed) == [0, 0, 0, 1, 1, 1]
    # Seven singletons in 3 folds: sizes 3, 2, 2; the seed decides which file goes where; the
    # order of the input does not.
    stems = [f"cell_{i}" for i in range(7)]
    folds = data.assign_folds(stems, 3, "", seed=137)
    assert sorted(np.bincount(folds)) == [2, 2, 3]
    assert data.assign_folds(stems, 3, "", seed=137) == folds
    assert data.assign_folds(stems[::-1], 3, "", seed=137) == folds[::-1]
    assert any(data.assign_folds(stems, 3, "", seed=s) != folds for s in range(1, 5))
    # Augmented copies stay with their original: no group in two folds.
    pattern = r"(?:flipped_|rotated_\d+_)?(.+)"
    stems = ["x", "flipped_x", "rotated_90_x", "y", "flipped_y", "z", "w"]
    folds = dict(zip(stems, data.assign_folds(stems, 2, pattern, seed=0)))
    assert folds["x"] == folds["flipped_x"] == folds["rotated_90_x"] and folds["y"] == folds["flipped_y"]
    assert folds["x"] != folds["y"]  # x (3) first into fold 0, y (2) into fold 1
    with pytest.raises(SegMlopsError, match=r"^data.folds=5 needs at least 5 groups, but the 7 pooled .* form 4 "):
        data.assign_folds(stems, 5, pattern, seed=0)
    with pytest.raises(SegMlopsError, match="at least 2 folds"):
        data.assign_folds(stems, 1, "", 0)


def test_fold_splits_partition_train_and_valid(tiny_cfg, binary_root):
    cfg = tiny_cfg("data.folds=3")
    pool = {p.image for split in ("train", "valid") for p in data.split_pairs(tiny_cfg(), split)}
    assert len(pool) == 12  # 8 train + 4 valid
    valids = []
    for fold in range(3):
        fold_cfg = crossval.fold_config(cfg, fold)
        train, valid = ({p.image for p in data.split_pairs(fold_cfg, s)} for s in ("train", "valid"))
        assert not train & valid and train | valid == pool
        assert data.split_pairs(fold_cfg, "test") == data.split_pairs(tiny_cfg(), "test")  # never pooled
        assert fold_cfg.output_dir == cfg.output_dir / "folds" / f"fold-{fold}"
        valids.append(valid)
    assert sorted(len(v) for v in valids) == [4, 4, 4] and set().union(*valids) == pool
    # One dataset, one fingerprint: the folds and a plain run share it.
    assert data.fingerprint(crossval.fold_config(cfg, 1)) == data.fingerprint(cfg) == data.fingerprint(tiny_cfg())
    with pytest.raises(SegMlopsError, match="data.fold=-1 trains every fold"):
        data.split_pairs(cfg, "train")
    for bad, message in ((["data.folds=1"], "data.folds=1: cross-validation needs at least 2 folds"),
                         (["data.folds=3", "data.fold=3"], r"data.fold=3 is not a fold of data.folds=3: use 0..2"),
                         (["data.fold=0"], r"data.fold=0 is not a fold of data.folds=0"),
                         (["data.folds=3", "data.valid_fraction=0.2"], "data.valid_fraction=0.2 has no meaning"),
                         (["tune.folds=1"], "tune.folds=1: cross-validation needs at least 2 folds")):
        with pytest.raises(SegMlopsError, match=message):
            tiny_cfg(*bad)


def test_ensemble_averages_probabilities_and_saves_as_keras(tmp_path):
    members = []
    for seed in (1, 2, 3):
        keras.utils.set_random_seed(seed)
        members.append(build_unet(image_height=32, image_width=32, base_filters=4, num_layers=3, num_classes=3))
    ensemble = average_models(members)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    probs = [m.predict_on_batch(x) for m in members]
    assert np.abs(probs[0] - probs[1]).max() > 1e-3  # the members differ
    np.testing.assert_allclose(ensemble.predict_on_batch(x), np.mean(probs, axis=0), atol=1e-6)
    assert ensemble.input_shape == members[0].input_shape and ensemble.output_shape == members[0].output_shape
    ensemble.save(tmp_path / "e.keras")
    np.testing.assert_allclose(load_model(tmp_path / "e.keras").predict_on_batch(x), np.mean(probs, axis=0),
                               atol=1e-6)
    with pytest.raises(SegMlopsError, match="at least 2 models"):
        average_models(members[:1])


class Interrupt(keras.callbacks.Callback):
    """Ctrl-C at the end of the first epoch (its state saved)."""

    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt


def test_cv_interrupted_in_fold_1_then_relaunched(tiny_cfg, tmp_path):
    cfg = tiny_cfg("experiment=cv", "data.folds=2", "train.epochs=2", "train.epoch_infer_count=1")
    with pytest.raises(KeyboardInterrupt):
        crossval.run_cv(cfg, fold_callbacks=lambda i: [Interrupt()] if i == 1 else [])
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["cv"], output_format="list")
    parent = next(r for r in runs if crossval.CV_KEY_TAG in r.data.tags)
    first = crossval.children(client, parent.info.run_id)
    assert parent.info.status == "KILLED"
    assert {i: r.info.status for i, r in first.items()} == {0: "FINISHED", 1: "KILLED"}
    history0 = [(m.step, m.value) for m in client.get_metric_history(first[0].info.run_id, "val_dice_coef")]

    # The same command again: fold 0 is kept, fold 1 continues in its own run, then the ensemble.
    path = tmp_path / "cv.yaml"
    path.write_text(config.to_yaml(cfg))
    out = CliRunner().invoke(cli, ["train", "--config", str(path)])
    assert out.exit_code == 0, out.output
    assert f"fold 0: run {first[0].info.run_id} FINISHED, not retrained" in out.output

    parent = client.get_run(parent.info.run_id)
    folds = crossval.children(client, parent.info.run_id)
    assert len(mlflow.search_runs(experiment_names=["cv"], output_format="list")) == 3  # parent + 2 folds
    assert {i: r.info.run_id for i, r in folds.items()} == {i: r.info.run_id for i, r in first.items()}
    assert [(m.step, m.value) for m in client.get_metric_history(folds[0].info.run_id, "val_dice_coef")] == history0
    assert folds[1].info.status == "FINISHED" and folds[1].data.tags[lifecycle.RESUMES_TAG] == "1"
    assert sorted(m.step for m in client.get_metric_history(folds[1].info.run_id, "loss")) == [0, 1]
    assert parent.info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in folds.values())
    assert all(r.data.tags["data.fold"] == str(i) for i, r in folds.items())

    # The parent: per-fold bests (step = fold), their mean and sample std; no best_<monitor>.
    bests = [folds[i].data.metrics["best_val_dice_coef"] for i in (0, 1)]
    assert [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "fold_best_val_dice_coef")] \
        == [(0, pytest.approx(bests[0])), (1, pytest.approx(bests[1]))]
    metrics = parent.data.metrics
    assert metrics["cv_mean_val_dice_coef"] == pytest.approx((bests[0] + bests[1]) / 2)
    assert metrics["cv_std_val_dice_coef"] == pytest.approx(abs(bests[0] - bests[1]) / np.sqrt(2))  # ddof=1
    assert "best_val_dice_coef" not in metrics
    assert "mean ± sample std over 2 folds" in out.output
    assert parent.data.tags["seg_mlops.dataset_fingerprint"] == data.fingerprint(tiny_cfg())

    # The ensemble: the mean of the fold models' probabilities, logged with its pipeline.
    ensemble = tracking.load_model(parent.data.tags[tracking.MODEL_URI_TAG])
    members = [load_model(cfg.output_dir / "folds" / f"fold-{i}" / MODEL_FILE) for i in (0, 1)]
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    mean = np.mean([m.predict_on_batch(x) for m in members], axis=0)
    np.testing.assert_allclose(ensemble.predict_on_batch(x), mean, atol=1e-6)
    pipeline = tracking.load_model(parent.data.tags[tracking.PIPELINE_URI_TAG])
    np.testing.assert_allclose(pipeline.predict_on_batch(x), mean, atol=1e-6)
    assert f"fold ensemble: test_dice_coef={metrics['test_dice_coef']:.4f}" in out.output

    # cv_summary.csv: each fold model's test scores (as its run logged them) and the ensemble's.
    local = client.download_artifacts(parent.info.run_id, crossval.SUMMARY_FILE, str(tmp_path))
    rows = list(csv.DictReader(open(local)))
    assert [r["model"] for r in rows] == ["fold-0", "fold-1", "ensemble"]
    for i in (0, 1):
        assert float(rows[i]["test_dice_coef"]) == pytest.approx(folds[i].data.metrics["test_dice_coef"], abs=1e-6)
        assert f"fold {i}: best val_dice_coef={bests[i]:.4f}" in out.output
    assert float(rows[2]["test_dice_coef"]) == pytest.approx(metrics["test_dice_coef"], abs=1e-6)
    assert rows[2]["best_val_dice_coef"] == ""
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        crossval.SUMMARY_FILE, crossval.PLOT_FILE, "evaluation.csv"}

    # Registrable as one model, on its test metric (it has no validation value).
    result = registry.register_best(cfg, metric="test_dice_coef", run_id=parent.info.run_id)
    assert result.run_id == parent.info.run_id and result.value == pytest.approx(metrics["test_dice_coef"])
    # A finished cross-validation is not silently trained again.
    with pytest.raises(SegMlopsError, match=r"cross-validation of this config is FINISHED .*--overwrite"):
        crossval.run_cv(cfg)


def test_cv_study_prunes_a_bad_trial_between_folds(tiny_cfg, tmp_path):
    # Same seed -> same initial weights and folds in every trial; lr 1e-9 cannot move val_loss, so
    # after fold 0 it is worse than the median of the two trials that learn (lr 0.02), and the
    # median rule (step = fold) stops it before fold 1.
    import optuna

    from seg_mlops import tuning

    cfg = tiny_cfg("experiment=cv-study", f"tune.storage={tmp_path / 'cv.journal'}", "tune.folds=2",
                   "tune.epochs=2", "tune.n_trials=3", "train.monitor=val_loss", "train.patience=0",
                   "train.epoch_infer_count=0", "tune.space={train.learning_rate: [0.02, 1.0e-9]}",
                   f"tune.artifact_dir={tmp_path / 'pictures'}")
    study = tuning.load_study(cfg)
    for lr in (0.02, 0.02, 1e-9):
        study.enqueue_trial({"train.learning_rate": lr})
    trials = tuning.run_study(cfg).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert sorted(trials[2].intermediate_values) == [0]  # fold 1 never trained

    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["cv-study"], output_format="list")
    study_run = next(r for r in runs if r.info.run_name == "study-cv-study")
    assert study_run.data.params["study.folds"] == "2"
    for trial in trials:
        trial_run = client.get_run(trial.user_attrs[tuning.RUN_ID_ATTR])
        assert trial_run.data.tags["mlflow.parentRunId"] == study_run.info.run_id
        folds = crossval.children(client, trial_run.info.run_id)  # study run -> trial run -> fold runs
        bests = [folds[i].data.metrics["best_val_loss"] for i in sorted(folds)]
        assert [trial.intermediate_values[i] for i in sorted(folds)] == pytest.approx(bests)
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert trial_run.info.status == "FINISHED" and sorted(folds) == [0, 1]
            assert trial.value == pytest.approx(np.mean(bests))
            assert trial_run.data.metrics["cv_mean_val_loss"] == pytest.approx(trial.value)
            assert trial.user_attrs[tuning.MODEL_URI_ATTR] == trial_run.data.tags[tracking.MODEL_URI_TAG]
        else:
            assert trial_run.info.status == "KILLED" and sorted(folds) == [0]
    assert trials[2].intermediate_values[0] > max(t.intermediate_values[0] for t in trials[:2])  # worse on fold 0
