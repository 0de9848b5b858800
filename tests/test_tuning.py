"""Optuna studies, real (journal storage, real MLflow): space, seeding with the config's values,
pruning, nested runs with mirrored states, plots on the parent run, resumption."""

from __future__ import annotations

import mlflow
import optuna
import pytest

from seg_mlops import config, tuning
from seg_mlops.errors import SegMlopsError


def test_suggest_types_follow_the_keys():
    cfg = config.load(None, ["tune.space={model.base_filters: [4, 8], model.num_layers: {low: 2, high: 4},"
                             " train.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}}"])
    trial = optuna.trial.FixedTrial({"model.base_filters": 8, "model.num_layers": 3, "train.learning_rate": 0.001})
    values = tuning.suggest(trial, cfg.tune.space, cfg)
    assert values == {"model.base_filters": 8, "model.num_layers": 3, "train.learning_rate": 0.001}
    assert isinstance(values["model.num_layers"], int) and isinstance(values["train.learning_rate"], float)


def test_own_values_seed_the_study_only_when_inside_the_space():
    cfg = config.load(None, ["model.base_filters=16", "train.learning_rate=0.001"])
    assert tuning.own_values(cfg) == {"model.base_filters": 16, "model.base_kernels": 3, "model.dilation": 1,
                                      "train.learning_rate": 0.001}
    assert tuning.own_values(config.override(cfg, {"model.base_filters": 12})) is None  # not a choice


def test_invalid_combination_is_rejected_before_training(tiny_cfg):
    cfg = tiny_cfg()
    with pytest.raises(SegMlopsError, match=r"not divisible by 2\*\*\(num_layers-1\)=64"):
        tuning.trial_config(cfg, {"model.num_layers": 7}, 0)
    trial_cfg = tuning.trial_config(cfg, {"model.base_filters": 8}, 7)
    assert trial_cfg.train.epochs == cfg.tune.epochs and trial_cfg.model.base_filters == 8
    assert trial_cfg.output_dir == cfg.output_dir / "trials" / "trial-0007"


def test_redact_hides_passwords():
    assert tuning.redact("postgresql://alice:s3cret@db:5432/optuna") == "postgresql://alice@db:5432/optuna"
    assert tuning.redact("postgresql://alice@db/optuna") == "postgresql://alice@db/optuna"
    assert tuning.redact("/tmp/optuna.journal") == "/tmp/optuna.journal"


def test_bad_storage_url_is_one_clear_error(tiny_cfg):
    cfg = tiny_cfg("tune.storage=postgresql://bob:pw@127.0.0.1:1/optuna")
    with pytest.raises(SegMlopsError) as info:
        tuning.load_study(cfg)
    message = str(info.value)
    assert message.startswith("cannot open Optuna storage postgresql://bob@127.0.0.1:1/optuna")
    assert "pw" not in message and "\n" not in message


def test_study_with_pruning_nested_runs_and_resume(tiny_cfg, tmp_path):
    # Same seed -> same initial weights in every trial; only the learning rate differs. With lr 1e-9
    # the loss cannot move, so after the warm-up epoch it is above the median of the two trials
    # that learn (lr 0.02), and the median pruner stops it.
    cfg = tiny_cfg("experiment=tiny-study", f"tune.storage={tmp_path / 'study.journal'}", "tune.epochs=3",
                   "tune.n_trials=3", "tune.warmup_epochs=1", "train.monitor=val_loss",
                   "train.learning_rate=0.02", "train.patience=0", "train.epoch_infer_count=1",
                   "tune.space={train.learning_rate: [0.02, 1.0e-9]}")
    study = tuning.load_study(cfg)
    for lr in (0.02, 0.02, 1e-9):
        study.enqueue_trial({"train.learning_rate": lr})
    study = tuning.run_study(cfg)

    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]
    assert study.direction == optuna.study.StudyDirection.MINIMIZE  # from train.monitor=val_loss
    pruned = trials[2]
    assert max(pruned.intermediate_values) < cfg.tune.epochs - 1  # stopped before its last epoch

    client = mlflow.MlflowClient()
    runs = {r.info.run_id: r for r in mlflow.search_runs(experiment_names=["tiny-study"], output_format="list")}
    parents = [r for r in runs.values() if r.info.run_name == "study-tiny-study"]
    assert len(parents) == 1
    parent = parents[0]
    for trial in trials:
        child = runs[trial.user_attrs[tuning.RUN_ID_ATTR]]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["train.learning_rate"] == str(trial.params["train.learning_rate"])
        assert child.info.status == ("KILLED" if trial.state.name == "PRUNED" else "FINISHED")
    # Pruned curves are kept: one point per epoch it ran.
    steps = [m.step for m in client.get_metric_history(pruned.user_attrs[tuning.RUN_ID_ATTR], "val_loss")]
    assert steps == sorted(pruned.intermediate_values)
    assert trials[0].user_attrs[tuning.MODEL_URI_ATTR].startswith("models:/")
    assert parent.data.params["study.storage"] == str(tmp_path / "study.journal")
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert artifacts == {"optuna/optimization_history.html", "optuna/param_importances.html",
                         "optuna/intermediate_values.html"}
    assert parent.info.status == "FINISHED"

    # Relaunch: the same study continues (trial numbers go on) under a new parent run.
    resumed = tuning.run_study(config.override(cfg, {"tune.n_trials": 4}))
    assert [t.number for t in resumed.get_trials()] == [0, 1, 2, 3]
    assert len([r for r in mlflow.search_runs(experiment_names=["tiny-study"], output_format="list")
                if r.info.run_name == "study-tiny-study"]) == 2
    assert tuning.best_trial_run_id(cfg) == resumed.best_trial.user_attrs[tuning.RUN_ID_ATTR]


def test_first_trial_is_the_config_itself(tiny_cfg, tmp_path):
    cfg = tiny_cfg("experiment=seeded", f"tune.storage={tmp_path / 's.journal'}", "tune.epochs=1",
                   "tune.n_trials=1", "model.base_filters=4", "train.learning_rate=0.01",
                   "tune.space={model.base_filters: [4, 8], train.learning_rate: {low: 0.001, high: 0.1}}")
    trial = tuning.run_study(cfg).get_trials()[0]
    assert trial.params == {"model.base_filters": 4, "train.learning_rate": 0.01}
    assert trial.user_attrs["seeded_from"] == "config"
    assert trial.user_attrs[tuning.MODEL_URI_ATTR].startswith("models:/")
