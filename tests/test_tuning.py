"""Optuna studies, real (journal storage, real MLflow): space, seeding with the config's values,
pruning, nested runs with mirrored states, plots on the parent run, resumption."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pytest

from seg_mlops import config, tracking, tuning
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
                   "tune.space={train.learning_rate: [0.02, 1.0e-9]}", f"tune.artifact_dir={tmp_path / 'pictures'}")
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
        assert child.data.tags["train.learning_rate"] == str(trial.params["train.learning_rate"])
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
    # Only the best trial is scored on the test split (into its own run, which stays FINISHED);
    # the others never see it, pruned or complete.
    best_run = client.get_run(study.best_trial.user_attrs[tuning.RUN_ID_ATTR])
    assert best_run.info.status == "FINISHED"
    assert best_run.data.metrics["test_loss"] == pytest.approx(parent.data.metrics["best_trial_test_loss"])
    assert "per_image.csv" in {a.path for a in client.list_artifacts(best_run.info.run_id)}
    for trial in trials:
        if trial.number != study.best_trial.number:
            metrics = client.get_run(trial.user_attrs[tuning.RUN_ID_ATTR]).data.metrics
            assert not [k for k in metrics if k.startswith("test_")], trial.number
    # Each complete trial's pictures are in the study's artifact store (optuna-dashboard shows them):
    # its best epoch's panel and its curves.
    for trial in trials[:2]:
        metas = optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)
        assert sorted(m.filename for m in metas) == ["best_epoch_panels.png", "train_losses.png", "train_metrics.png"]
        assert all((tmp_path / "pictures" / m.artifact_id).is_file() for m in metas)

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


def test_dropout_too_deep_for_the_depth_is_a_pruned_trial(tiny_cfg, tmp_path):
    # 3 levels: dropout 0.5 gives the bridge 0.5 * 2 = 1.0 (drops everything); the trial is pruned
    # as an invalid combination before training, and the study goes on.
    cfg = tiny_cfg("experiment=deep-dropout", f"tune.storage={tmp_path / 'd.journal'}", "tune.epochs=1",
                   "tune.n_trials=2", "tune.pruner=none", "tune.space={model.dropout_rate: [0.0, 0.5]}")
    study = tuning.load_study(cfg)
    for rate in (0.5, 0.0):
        study.enqueue_trial({"model.dropout_rate": rate})
    trials = tuning.run_study(cfg).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]
    assert trials[0].user_attrs["invalid"].startswith("model.dropout_rate=0.5 with model.num_layers=3 ")
    assert tuning.RUN_ID_ATTR not in trials[0].user_attrs  # never trained
    assert trials[1].params == {"model.dropout_rate": 0.0}


def _failing_train(monkeypatch, when, error):
    """seg_mlops.train.train (our code, inside the trial's MLflow run) raising `error(cfg)` for the
    trials `when(cfg)` picks: a trial failure where Keras would have one, without mocking Optuna."""
    from seg_mlops import train as train_mod

    real = train_mod.train

    def train(cfg, **kwargs):
        if when(cfg):
            raise error(cfg)
        return real(cfg, **kwargs)

    monkeypatch.setattr(train_mod, "train", train)


def _trial_runs(experiment: str) -> dict[int, mlflow.entities.Run]:
    from seg_mlops import registry

    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    return {int(r.data.tags[registry.TRIAL_TAG]): r for r in runs if registry.TRIAL_TAG in r.data.tags}


def test_unexpected_trial_error_fails_that_trial_and_the_study_goes_on(tiny_cfg, tmp_path, monkeypatch,
                                                                      capsys):
    _failing_train(monkeypatch, lambda cfg: cfg.model.base_filters == 8,
                   lambda cfg: RuntimeError("out of memory\nallocating a tensor"))
    cfg = tiny_cfg("experiment=one-bad-trial", f"tune.storage={tmp_path / 'f.journal'}", "tune.epochs=1",
                   "tune.n_trials=2", "tune.pruner=none", "tune.space={model.base_filters: [4, 8]}")
    study = tuning.load_study(cfg)
    for filters in (4, 8, 4):
        study.enqueue_trial({"model.base_filters": filters})
    study = tuning.run_study(cfg)  # returns normally

    trials = study.get_trials()
    # n_trials counts finished trials: the failed one does not use up a place.
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                                         optuna.trial.TrialState.COMPLETE]
    assert trials[1].user_attrs[tuning.FAIL_REASON_ATTR] == "RuntimeError: out of memory allocating a tensor"
    assert "trial 1 failed (RuntimeError: out of memory allocating a tensor)" in capsys.readouterr().out
    runs = _trial_runs("one-bad-trial")
    assert {n: r.info.status for n, r in runs.items()} == {0: "FINISHED", 1: "FAILED", 2: "FINISHED"}
    assert trials[1].user_attrs[tuning.RUN_ID_ATTR] == runs[1].info.run_id  # the reason leads to the run
    parent = [r for r in mlflow.search_runs(experiment_names=["one-bad-trial"], output_format="list")
              if r.info.run_name == "study-one-bad-trial"]
    assert [r.info.status for r in parent] == ["FINISHED"]


def test_user_error_in_a_trial_stops_the_study(tiny_cfg, binary_root, tmp_path, monkeypatch):
    # The valid split disappears during the study: every later trial would fail the same way.
    import shutil

    root = shutil.copytree(binary_root, tmp_path / "data")

    def vanish(cfg):
        if cfg.model.base_filters == 8:
            shutil.rmtree(root / "valid")
        return False

    _failing_train(monkeypatch, vanish, None)
    cfg = tiny_cfg("experiment=data-gone", f"data.root={root}", f"tune.storage={tmp_path / 'g.journal'}",
                   "tune.epochs=1", "tune.n_trials=3", "tune.pruner=none",
                   "tune.space={model.base_filters: [4, 8]}")
    study = tuning.load_study(cfg)
    for filters in (4, 8, 4):
        study.enqueue_trial({"model.base_filters": filters})
    with pytest.raises(SegMlopsError, match=r"^no validation split: .*valid"):
        tuning.run_study(cfg)

    trials = tuning.load_study(cfg).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                                         optuna.trial.TrialState.WAITING]  # the third never started
    assert trials[1].user_attrs[tuning.FAIL_REASON_ATTR].startswith("SegMlopsError: no validation split: ")
    assert {n: r.info.status for n, r in _trial_runs("data-gone").items()} == {0: "FINISHED", 1: "FAILED"}
    parent = [r for r in mlflow.search_runs(experiment_names=["data-gone"], output_format="list")
              if r.info.run_name == "study-data-gone"]
    assert [r.info.status for r in parent] == ["FAILED"]


def test_consecutive_unexpected_failures_stop_the_study(tiny_cfg, tmp_path, monkeypatch):
    # Every trial failing the same way is a bug or a broken machine, not bad hyper-parameters.
    _failing_train(monkeypatch, lambda cfg: True, lambda cfg: ZeroDivisionError("division by zero"))
    cfg = tiny_cfg("experiment=all-bad", f"tune.storage={tmp_path / 'b.journal'}", "tune.epochs=1",
                   "tune.n_trials=10", "tune.pruner=none", "tune.space={model.base_filters: [4, 8]}")
    with pytest.raises(SegMlopsError) as info:
        tuning.run_study(cfg)
    assert str(info.value) == (
        f"{tuning.MAX_CONSECUTIVE_FAILURES} trials in a row failed in study 'all-bad' (last: trial 2, "
        "ZeroDivisionError: division by zero): a bug or a broken environment rather than the "
        "hyper-parameters; rerun with seg-mlops --debug for the traceback")
    trials = tuning.load_study(cfg).get_trials()
    assert tuning.MAX_CONSECUTIVE_FAILURES == 3
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 3
    assert all(t.user_attrs[tuning.FAIL_REASON_ATTR] == "ZeroDivisionError: division by zero" for t in trials)


# ----------------------------------------------------------------------------- many workers, PostgreSQL

def _worker_yaml(tmp_path, binary_root, name: str, **tune) -> Path:
    import yaml

    from tests.conftest import TINY

    flat = config.parse_overrides(TINY + [f"data.root={binary_root}", f"train.output_dir={tmp_path / name}",
                                          "train.patience=0", "train.epoch_infer_count=1"])
    nested: dict = {"experiment": name,
                    "tune": {"epochs": 2, "pruner": "none",
                             "space": {"train.learning_rate": {"low": 0.001, "high": 0.05, "log": True}},
                             **tune}}
    for key, value in flat.items():
        section, key_name = key.split(".")
        nested.setdefault(section, {})[key_name] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(nested))
    return path


def _worker(path, storage: str, n_trials: int, mlflow_uri: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([sys.executable, "-m", "seg_mlops.cli", "tune", "--config", str(path),
                             "--storage", storage, "--n-trials", str(n_trials)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_workers_share_one_study(postgres_url, binary_root, tmp_path, tracking_store):
    path = _worker_yaml(tmp_path, binary_root, "two-workers")
    tracking.connect("two-workers")  # a fresh sqlite store is migrated once, not by two racing workers
    optuna.storages.RDBStorage(postgres_url)  # so is a fresh Optuna schema (its CREATE TABLEs race too)
    workers = [_worker(path, postgres_url, 4, tracking_store) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]

    study = optuna.load_study(study_name="two-workers", storage=postgres_url)
    trials = study.get_trials()
    # Each worker stops once the study holds 4 finished trials; one in flight may finish too.
    assert 4 <= len(trials) <= 5
    assert [t.number for t in trials] == list(range(len(trials)))  # none lost
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    run_ids = [t.user_attrs[tuning.RUN_ID_ATTR] for t in trials]
    assert len(set(run_ids)) == len(trials)  # no trial trained twice
    mlflow.set_tracking_uri(tracking_store)
    children = [r for r in mlflow.search_runs(experiment_names=["two-workers"], output_format="list")
                if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.info.run_id for r in children) == sorted(run_ids)  # one run per trial, none duplicated
    assert len({r.data.tags["mlflow.parentRunId"] for r in children}) == 2  # one parent per worker


def test_killed_worker_trial_is_retried(postgres_url, binary_root, tmp_path, tracking_store):
    import signal
    import time

    from optuna.storages import RetryHeartbeatStaleTrialCallback

    path = _worker_yaml(tmp_path, binary_root, "killed-worker", heartbeat_seconds=1, epochs=30)
    tracking.connect("killed-worker")
    doomed = _worker(path, postgres_url, 2, tracking_store)
    deadline = time.time() + 300
    running = []
    while time.time() < deadline and not running:  # wait until a trial is really training
        time.sleep(1)
        try:
            study = optuna.load_study(study_name="killed-worker", storage=postgres_url)
        except KeyError:
            continue
        running = [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
                   if tuning.RUN_ID_ATTR in t.user_attrs]
    assert running, "the first worker never started training"
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    # Wait until the storage itself sees the trial stale: past the grace period (2 heartbeats of
    # 1 s, measured on the database's clock) without a heartbeat.
    storage = optuna.storages.RDBStorage(postgres_url, heartbeat_interval=1, grace_period=2)
    study_id = storage.get_study_id_from_name("killed-worker")
    deadline = time.time() + 60
    while running[0]._trial_id not in storage._get_stale_trial_ids(study_id):
        assert time.time() < deadline, "the killed worker's trial never became stale"
        time.sleep(0.2)

    # A second worker finds the stale trial, fails it, and runs its retry (shorter epochs: the
    # retried trial keeps its params; tune.epochs is the worker's own setting).
    survivor_yaml = _worker_yaml(tmp_path, binary_root, "killed-worker", heartbeat_seconds=1, epochs=2)
    survivor = _worker(survivor_yaml, postgres_url, 2, tracking_store)
    output = survivor.communicate(timeout=600)[0]
    assert survivor.returncode == 0, output[-3000:]

    trials = optuna.load_study(study_name="killed-worker", storage=postgres_url).get_trials()
    killed = running[0].number
    assert trials[killed].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].params == trials[killed].params
    assert len([t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]) == 2


def test_dashboard_shows_the_study(tiny_cfg, tmp_path):
    import json
    import os
    import sys
    import urllib.request

    from tests.test_mlflow import free_port, serve, venv_env

    journal = tmp_path / "dash.journal"
    cfg = tiny_cfg("experiment=on-the-dashboard", f"tune.storage={journal}")
    study = tuning.load_study(cfg)
    study.enqueue_trial({"model.base_filters": 4})
    port = free_port()
    path = tmp_path / "dash.yaml"
    path.write_text(f"experiment: on-the-dashboard\ntune:\n  storage: {journal}\n")
    args = [sys.executable, "-m", "seg_mlops.cli", "dashboard", "--config", str(path), "--port", str(port)]
    with serve(args, f"http://127.0.0.1:{port}/api/studies", venv_env()):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30) as response:
            studies = json.loads(response.read())["study_summaries"]
    assert [s["study_name"] for s in studies] == ["on-the-dashboard"]
    assert os.path.exists(journal)


def test_relaunch_does_not_replay_the_same_trials(tmp_path, tiny_cfg):
    # The sampler of a resumed study must not draw the startup trials it drew before.
    cfg = tiny_cfg("experiment=replay", f"tune.storage={tmp_path / 'r.journal'}", "tune.sampler=random",
                   "tune.space={train.learning_rate: {low: 0.001, high: 0.1, log: true}}")
    first = tuning.load_study(cfg)
    first.optimize(lambda t: t.suggest_float("train.learning_rate", 0.001, 0.1, log=True), n_trials=3)
    again = tuning.load_study(cfg)
    again.optimize(lambda t: t.suggest_float("train.learning_rate", 0.001, 0.1, log=True), n_trials=3)
    values = [t.params["train.learning_rate"] for t in again.get_trials()]
    assert len(values) == 6 and len(set(values)) == 6


def test_trial_value_is_the_best_epoch_not_the_last(tiny_cfg, tmp_path):
    """The objective returns the best epoch's value by the monitor's direction. A large learning
    rate (0.3) makes val_loss bounce: with this seed its minimum is at epoch 1 and epoch 2 is
    worse, so the trial's value must be that minimum, read back from the run's MLflow history."""
    cfg = tiny_cfg("experiment=best-epoch", f"tune.storage={tmp_path / 'best.journal'}", "tune.epochs=3",
                   "tune.n_trials=1", "tune.pruner=none", "train.monitor=val_loss", "train.learning_rate=0.3",
                   "train.patience=0", "train.epoch_infer_count=0", "tune.space={train.learning_rate: [0.3]}")
    trial = tuning.run_study(cfg).get_trials()[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    run_id = trial.user_attrs[tuning.RUN_ID_ATTR]
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run_id, "val_loss")
    assert [m.step for m in history] == [0, 1, 2]
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert values[-1] > min(values)  # the case: the last epoch is not the best
    assert trial.value == pytest.approx(min(values), rel=1e-6) and trial.value != pytest.approx(values[-1])
    assert client.get_run(run_id).data.metrics["best_val_loss"] == pytest.approx(trial.value, rel=1e-6)
    # what the pruner saw per epoch is that same history
    assert [trial.intermediate_values[e] for e in range(3)] == pytest.approx(values, rel=1e-6)


def test_progress_line_says_how_far_the_study_is():
    study = optuna.create_study(direction="maximize")
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for value in (0.5, 0.75):
        study.add_trial(optuna.trial.create_trial(params={"x": value}, distributions=space, value=value))
    study.add_trial(optuna.trial.create_trial(params={"x": 0.1}, distributions=space,
                                              state=optuna.trial.TrialState.PRUNED))
    line = tuning.progress_line(study, study.trials[2], 20, "val_dice_coef")
    assert line == "trial 2: pruned; 3 of 20 finished; best 0.7500 (trial 1)"
    assert tuning.progress_line(study, study.trials[0], 20, "val_dice_coef").startswith(
        "trial 0: complete, val_dice_coef 0.5000; 3 of 20 finished")
