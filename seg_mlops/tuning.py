"""Optuna studies per dataset: search space from the config, objective, pruning, storages, and the
MLflow parent/child runs of a study launch.

The objective only wires things together: config overrides from the trial in, the unchanged
tracked training (`tracking.train`) with a pruning callback, the monitored metric out. Study name =
experiment; relaunching the same command resumes the study; on an RDB storage (PostgreSQL) a worker
that dies has its trial retried by another (heartbeats).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from seg_mlops import config as config_mod
from seg_mlops import lifecycle, losses, registry, tracking
from seg_mlops.config import Config
from seg_mlops.errors import SegMlopsError
from seg_mlops.model import check_args

RUN_ID_ATTR = "mlflow_run_id"
MODEL_URI_ATTR = "model_uri"
FAIL_REASON_ATTR = "fail_reason"
SEEDED_ATTR = "seeded_from"  # "config" on the trial of the config's own values (the study's first)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A trial failing with an unexpected error (not a SegMlopsError) ends FAIL and the study goes on:
# one OOM or numerical blow-up of an extreme trial must not cost the study. This many in a row,
# though, is a bug or a broken machine rather than bad hyper-parameters: the study stops then.
MAX_CONSECUTIVE_FAILURES = 3


class _TrialFailed(Exception):
    """An unexpected error of one trial, already recorded: the only exception study.optimize catches."""


# ----------------------------------------------------------------------------- search space

def distributions(space: dict[str, Any], cfg: Config) -> dict[str, optuna.distributions.BaseDistribution]:
    """Optuna's distribution of every key of the space: lists are categorical, {low, high} ranges
    are int or float as the key's own type (config.py already checked the space)."""
    current = config_mod.flatten(cfg)
    found: dict[str, optuna.distributions.BaseDistribution] = {}
    for key, spec in space.items():
        if isinstance(spec, (list, tuple)):
            found[key] = optuna.distributions.CategoricalDistribution(list(spec))
        elif isinstance(current[key], int):
            found[key] = optuna.distributions.IntDistribution(
                spec["low"], spec["high"], step=spec.get("step", 1), log=spec.get("log", False))
        else:
            found[key] = optuna.distributions.FloatDistribution(
                spec["low"], spec["high"], step=spec.get("step"), log=spec.get("log", False))
    return found


def suggest(trial: optuna.Trial, space: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """The trial's values for every key of the space (see `distributions`)."""
    values = {}
    for key, dist in distributions(space, cfg).items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            values[key] = trial.suggest_categorical(key, list(dist.choices))
        elif isinstance(dist, optuna.distributions.IntDistribution):
            values[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            values[key] = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return values


def check_space(study: optuna.Study, cfg: Config) -> None:
    """Refuse to resume a study whose stored trials searched a key in a way the config's space
    cannot continue (another kind, log scale or set of choices: Optuna's own compatibility rule).
    Optuna itself would accept it and let the sampler mix both spaces silently. Widening or
    narrowing a range stays allowed."""
    wanted = distributions(cfg.tune.space, cfg)
    for trial in study.get_trials(deepcopy=False):
        for key, stored in trial.distributions.items():
            if key not in wanted:
                continue
            try:
                optuna.distributions.check_distribution_compatibility(stored, wanted[key])
            except ValueError as exc:
                raise SegMlopsError(
                    f"tune.space.{key}: study '{cfg.experiment}' in {redact(storage_url(cfg))} searched it as "
                    f"{stored} (trial {trial.number}), the config gives {wanted[key]} ({exc}); restore the "
                    "space, or start a new study with --set experiment=<new name>") from None


def own_values(cfg: Config) -> dict[str, Any] | None:
    """The config's own values for the searched keys, when they lie inside the space (so the
    study can start from the hand-picked config and never end worse than it)."""
    current = config_mod.flatten(cfg)
    values = {key: current[key] for key in cfg.tune.space}
    for key, spec in cfg.tune.space.items():
        value = values[key]
        inside = value in spec if isinstance(spec, (list, tuple)) else spec["low"] <= value <= spec["high"]
        if not inside:
            return None
    return values


def trial_config(cfg: Config, values: dict[str, Any], number: int) -> Config:
    """The trial's config: the suggested values, tune.epochs, its own output folder. Raises
    SegMlopsError for combinations the model cannot be built with (checked before training)."""
    trial_cfg = config_mod.override(cfg, {
        **values, "train.epochs": cfg.tune.epochs,
        "train.output_dir": str(cfg.output_dir / "trials" / f"trial-{number:04d}"),
        # tune.folds decides: a cross-validated trial (all folds), or one run on the valid split
        "data.folds": cfg.tune.folds, "data.fold": -1})
    check_args(**dataclasses.asdict(trial_cfg.model))
    return trial_cfg


# ----------------------------------------------------------------------------- storage, study

def storage_url(cfg: Config) -> str:
    """cfg.tune.storage, or the journal file tracking/optuna.journal beside the MLflow store."""
    return cfg.tune.storage or str(tracking.TRACKING_HOME.resolve() / "optuna.journal")


redact = config_mod.redact  # a storage URL without its password (kept here: its old home)


def make_storage(cfg: Config) -> optuna.storages.BaseStorage:
    url = storage_url(cfg)
    if "://" not in url:  # a journal file: several processes on one machine, no server needed
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    beat = cfg.tune.heartbeat_seconds
    try:
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=beat, grace_period=2 * beat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
    except Exception as exc:  # sqlalchemy/driver errors: the user needs the URL (no password) and why
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SegMlopsError(f"cannot open Optuna storage {redact(url)} ({reason}); check tune.storage / "
                            "--storage, and that the database server is running") from None


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    """The pruner of tune.pruner. Its steps are epochs, or folds in a cross-validated study
    (tune.folds): there a trial is compared with the others on the same fold, from the first fold
    on (see bench/cv_pruners.py for why the median rule and not Optuna's WilcoxonPruner)."""
    if cfg.tune.folds:
        if cfg.tune.pruner == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
        if cfg.tune.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.tune.folds)
        return optuna.pruners.NopPruner()
    if cfg.tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=cfg.tune.warmup_epochs)
    if cfg.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.tune.epochs)
    return optuna.pruners.NopPruner()


def load_study(cfg: Config) -> optuna.Study:
    """The dataset's study (created when missing): study name = experiment."""
    direction = "minimize" if losses.monitor_mode(cfg.train.monitor) == "min" else "maximize"
    try:
        study = optuna.create_study(study_name=cfg.experiment, storage=make_storage(cfg),
                                    pruner=make_pruner(cfg), direction=direction, load_if_exists=True)
    except ValueError as exc:  # e.g. a stored multi-objective study
        raise SegMlopsError(f"study '{cfg.experiment}' in {redact(storage_url(cfg))}: {exc}") from None
    # load_if_exists ignores `direction`: a study made for another train.monitor would rank this
    # config's values backwards (best = worst) without a word.
    stored = study.direction.name.lower()
    if stored != direction:
        raise SegMlopsError(
            f"study '{cfg.experiment}' in {redact(storage_url(cfg))} was made to {stored} its metric, but "
            f"train.monitor={cfg.train.monitor} must be {direction}d; use the monitor the study was made "
            "with, or start a new study with --set experiment=<new name>")
    # Seeded from the config's seed, the trials already there and this process: a relaunch or a
    # second worker seeded with cfg.seed alone would replay the same startup trials.
    seed = int(np.random.SeedSequence([cfg.seed, len(study.trials), os.getpid()]).generate_state(1)[0])
    study.sampler = (optuna.samplers.TPESampler(seed=seed) if cfg.tune.sampler == "tpe"
                     else optuna.samplers.RandomSampler(seed=seed))
    return study


# ----------------------------------------------------------------------------- objective

class _RecordRun(keras.callbacks.Callback):
    """Stores the trial's MLflow run id on the trial as soon as the run exists (pruned trials too)."""

    def __init__(self, trial: optuna.Trial):
        super().__init__()
        self.trial = trial

    def on_train_begin(self, logs=None):
        self.trial.set_user_attr(RUN_ID_ATTR, mlflow.active_run().info.run_id)


def objective(trial: optuna.Trial, cfg: Config, parent_run_id: str) -> float:
    """Config overrides in, the tracked training unchanged, the best monitored value out."""
    from optuna_integration import KerasPruningCallback

    try:
        trial_cfg = trial_config(cfg, suggest(trial, cfg.tune.space, cfg), trial.number)
    except SegMlopsError as exc:  # e.g. a depth the image size cannot hold: never trained
        trial.set_user_attr("invalid", str(exc))
        raise optuna.TrialPruned(f"invalid combination: {exc}") from None
    keras.backend.clear_session()  # trials share the process: free the previous graph
    if cfg.tune.folds:
        return cv_objective(trial, cfg, trial_cfg, parent_run_id)
    result, run_id = tracking.train(
        trial_cfg, overwrite=True, run_name=f"trial-{trial.number}", parent_run_id=parent_run_id,
        tags={registry.STUDY_TAG: cfg.experiment, registry.TRIAL_TAG: str(trial.number)},
        extra_callbacks=[_RecordRun(trial), KerasPruningCallback(trial, cfg.train.monitor)],
        killed_by=(KeyboardInterrupt, optuna.TrialPruned), score_test=False)  # test: the best only
    trial.set_user_attr(MODEL_URI_ATTR, mlflow.get_run(run_id).data.tags[tracking.MODEL_URI_TAG])
    values = result.history[cfg.train.monitor]
    upload_pictures(trial, cfg, result)
    return losses.best_value(values, cfg.train.monitor)


def cv_objective(trial: optuna.Trial, cfg: Config, trial_cfg: Config, parent_run_id: str) -> float:
    """A cross-validated trial: its run is the parent of its fold runs (study run -> trial run ->
    fold runs); each fold's best monitored value is reported at step = fold, the pruner may stop
    the trial between folds (no per-epoch pruning: the steps are folds), and the value is the mean
    over the folds. A complete trial logs its fold ensemble like `seg-mlops train` does."""
    from seg_mlops import crossval

    run_id = crossval.create_parent(trial_cfg, tracking.connect(cfg.experiment), run_name=f"trial-{trial.number}",
                                    parent_run_id=parent_run_id,
                                    tags={registry.STUDY_TAG: cfg.experiment, registry.TRIAL_TAG: str(trial.number)})
    trial.set_user_attr(RUN_ID_ATTR, run_id)

    def report(fold: crossval.Fold) -> None:
        trial.report(fold.best, step=fold.index)
        if fold.index < cfg.tune.folds - 1 and trial.should_prune():  # after the last fold: nothing saved
            raise optuna.TrialPruned(f"pruned after fold {fold.index}: {cfg.train.monitor} {fold.best:.4f}")

    result = crossval.in_parent(trial_cfg, run_id, overwrite=True, after_fold=report, score_test=False,
                                killed_by=(KeyboardInterrupt, optuna.TrialPruned))
    trial.set_user_attr(MODEL_URI_ATTR, result.model_uri)
    trial.set_user_attr("cv_std", result.std)
    upload(trial, cfg, [trial_cfg.output_dir / "ensemble" / crossval.PLOT_FILE])
    return result.mean


def artifact_dir(cfg: Config) -> Path:
    """tune.artifact_dir, else `optuna-artifacts` beside the journal file (tracking/ for the
    default journal and for database storages)."""
    if cfg.tune.artifact_dir:
        return Path(cfg.tune.artifact_dir)
    url = storage_url(cfg)
    return (Path(url).parent if "://" not in url else tracking.TRACKING_HOME.resolve()) / "optuna-artifacts"


def upload_pictures(trial: optuna.Trial, cfg: Config, result) -> list[str]:
    """Upload what a trial's model does to the study's artifact store (optuna-dashboard shows them
    on the trial): its epoch-inference panels of the best epoch in one picture, and its curves.
    Returns the uploaded file names."""
    from PIL import Image

    from seg_mlops.callbacks import composite

    out = result.output_dir
    values = result.history[cfg.train.monitor]
    best = losses.best_value(values, cfg.train.monitor)
    files = []
    if best == best:  # not NaN
        epoch = values.index(best) + 1  # panel files are numbered from 1
        panels = [np.asarray(Image.open(p).convert("RGB"))
                  for p in sorted((out / "epoch_infer").glob(f"epoch_{epoch:03d}_*.png"))]
        if panels:
            Image.fromarray(composite(panels)).save(out / "best_epoch_panels.png")
            files.append(out / "best_epoch_panels.png")
    files += [out / name for name in ("train_metrics.png", "train_losses.png") if (out / name).is_file()]
    return upload(trial, cfg, files)


def upload(trial: optuna.Trial, cfg: Config, files: list[Path]) -> list[str]:
    """Upload PNG files to the study's artifact store, attached to `trial`; returns their names."""
    artifact_dir(cfg).mkdir(parents=True, exist_ok=True)
    store = optuna.artifacts.FileSystemArtifactStore(str(artifact_dir(cfg)))
    for path in files:
        optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial,
                                         mimetype="image/png")
    return [p.name for p in files]


class _FailurePolicy:
    """Wraps the objective: a SegMlopsError (bad data, storage, tracking server: the same for every
    trial) stops the study; any other Exception fails only its trial, with the one-line reason in
    the trial's `fail_reason`, until MAX_CONSECUTIVE_FAILURES in a row. TrialPruned and
    KeyboardInterrupt pass through untouched."""

    def __init__(self, cfg: Config, parent_run_id: str):
        self.cfg, self.parent_run_id, self.in_a_row = cfg, parent_run_id, 0

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            value = objective(trial, self.cfg, self.parent_run_id)
        except optuna.TrialPruned:
            self.in_a_row = 0
            raise
        except Exception as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
            _record_failed_run(trial)
            if isinstance(exc, SegMlopsError):
                raise
            self._count_failure(trial, reason, exc)
            raise _TrialFailed(reason) from exc
        self.in_a_row = 0
        return value

    def _count_failure(self, trial: optuna.Trial, reason: str, exc: Exception) -> None:
        """Note the failure; at MAX_CONSECUTIVE_FAILURES in a row, stop the study."""
        self.in_a_row += 1
        if self.in_a_row >= MAX_CONSECUTIVE_FAILURES:
            raise SegMlopsError(
                f"{self.in_a_row} trials in a row failed in study '{self.cfg.experiment}' (last: trial "
                f"{trial.number}, {reason}): a bug or a broken environment rather than the "
                "hyper-parameters; rerun with seg-mlops --debug for the traceback") from exc
        print(f"note: trial {trial.number} failed ({reason}); the study goes on")


def _record_failed_run(trial: optuna.Trial) -> None:
    """Link a trial that failed before training began (_RecordRun never ran) to its FAILED run."""
    if RUN_ID_ATTR in trial.user_attrs:
        return
    try:
        run = mlflow.last_active_run()
    except Exception:  # the server is gone: the reason is recorded all the same
        return
    if run is not None and run.data.tags.get(registry.TRIAL_TAG) == str(trial.number) \
            and run.data.tags.get(registry.STUDY_TAG) == trial.study.study_name:
        trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)


# ----------------------------------------------------------------------------- a study launch

def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def progress_line(study: optuna.Study, trial: optuna.trial.FrozenTrial, n_trials: int, monitor: str) -> str:
    """How far the study is after `trial`: "trial 3: complete, val_dice_coef 0.6120; 4 of 20
    finished; best 0.6532 (trial 1)". Finished = complete or pruned, all workers together."""
    state = trial.state.name.lower()
    value = f", {monitor} {trial.value:.4f}" if trial.value is not None else ""
    line = f"trial {trial.number}: {state}{value}; {finished(study)} of {n_trials} finished"
    if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        line += f"; best {study.best_value:.4f} (trial {study.best_trial.number})"
    return line


def run_study(cfg: Config, *, n_trials: int | None = None, timeout: float | None = None) -> optuna.Study:
    """One launch (one worker) of the dataset's study, inside a parent MLflow run.

    Runs trials until the study holds `n_trials` finished trials in all (other workers' included)
    or `timeout` seconds pass. The config's own values are the first trial of a new study. A trial
    that fails unexpectedly ends FAIL (see _FailurePolicy) and does not count as finished.
    """
    n_trials = n_trials or cfg.tune.n_trials
    timeout = timeout if timeout is not None else (cfg.tune.timeout or None)
    study = load_study(cfg)
    check_space(study, cfg)
    if not study.trials and (values := own_values(cfg)) is not None:
        study.enqueue_trial(values, user_attrs={SEEDED_ATTR: "config"})
    experiment_id = tracking.connect(cfg.experiment)
    client = MlflowClient()
    # Under `mlflow run . -e tune` the entry point's run is the parent; trials must not resume it.
    parent_id = os.environ.pop("MLFLOW_RUN_ID", None) or client.create_run(
        experiment_id, run_name=f"study-{cfg.experiment}").info.run_id
    url = redact(storage_url(cfg))
    client.set_tag(parent_id, registry.STUDY_TAG, cfg.experiment)
    # host/pid tags: if this process is killed, the next command marks the parent run FAILED
    for key, value in lifecycle.process_tags().items():
        client.set_tag(parent_id, key, value)
    for key, value in {"study.name": cfg.experiment, "study.storage": url, "study.sampler": cfg.tune.sampler,
                       "study.pruner": cfg.tune.pruner, "study.epochs_per_trial": cfg.tune.epochs,
                       "study.folds": cfg.tune.folds,
                       "study.n_trials": n_trials, "study.space": cfg.tune.space}.items():
        client.log_param(parent_id, key, str(value))

    def log_best(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        client.log_metric(parent_id, "finished_trials", finished(study), step=trial.number)
        if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            client.log_metric(parent_id, "best_value", study.best_value, step=trial.number)
        print(progress_line(study, trial, n_trials, cfg.train.monitor), flush=True)

    remaining = n_trials - finished(study)
    status = "FINISHED"
    try:
        if remaining > 0:
            # No trial count here: MaxTrialsCallback stops once `n_trials` are finished, so a failed
            # trial does not take a finished one's place (_FailurePolicy bounds a run of failures).
            study.optimize(
                _FailurePolicy(cfg, parent_id), timeout=timeout, gc_after_trial=True, catch=(_TrialFailed,),
                callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=FINISHED), log_best])
        else:
            print(f"study '{cfg.experiment}' already has {finished(study)} finished trials (n_trials={n_trials})")
        log_plots(study, client, parent_id)
        score_best(study, cfg, client, parent_id)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        client.set_terminated(parent_id, status)
    return study


def score_best(study: optuna.Study, cfg: Config, client: MlflowClient, parent_id: str) -> None:
    """Score the study's best trial on the test split, into its run, and copy the numbers to the
    study run as `best_trial_test_*`. Only the best: trials are chosen on validation, and a test
    score for every trial would invite picking on test (and cost every trial an evaluation)."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return
    best = study.best_trial
    results = tracking.score_run(best.user_attrs[RUN_ID_ATTR], trial_config(cfg, best.params, best.number))
    for name, value in results.items():
        client.log_metric(parent_id, f"best_trial_test_{name}", value)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k in ("dice_coef", "mean_image_dice", "loss"))
    print(f"best trial {best.number} on the test split: {shown}", flush=True)


def log_plots(study: optuna.Study, client: MlflowClient, run_id: str) -> None:
    """Optuna's optimization history, parameter importances and intermediate values as HTML."""
    from optuna import visualization as vis

    plots = {"optimization_history": vis.plot_optimization_history,
             "param_importances": vis.plot_param_importances,
             "intermediate_values": vis.plot_intermediate_values}
    with tempfile.TemporaryDirectory() as tmp:
        for name, plot in plots.items():
            try:
                figure = plot(study)
            except (ValueError, RuntimeError) as exc:  # e.g. importances need 2+ complete trials
                print(f"note: no {name} plot yet ({exc})")
                continue
            path = Path(tmp) / f"{name}.html"
            figure.write_html(str(path), include_plotlyjs=True)  # self-contained: offline UIs render it
            client.log_artifact(run_id, str(path), artifact_path="optuna")


def best_trial_run_id(cfg: Config) -> str:
    """The MLflow run of the study's best trial (for registration)."""
    study = load_study(cfg)
    try:
        best = study.best_trial
    except ValueError:
        raise SegMlopsError(f"study '{cfg.experiment}' has no complete trial yet: run seg-mlops tune first") from None
    return best.user_attrs[RUN_ID_ATTR]


def seed_and_best_run_ids(cfg: Config) -> tuple[tuple[int, str], tuple[int, str]]:
    """((number, run id) of the study's seeded trial, the config's own values; (number, run id)
    of its best trial): what `seg-mlops compare --study` compares on held-out data."""
    study = load_study(cfg)
    seeded = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(SEEDED_ATTR) == "config"]
    if not seeded:
        raise SegMlopsError(f"study '{cfg.experiment}' has no trial seeded with the config's own values (no "
                            "trial yet: run seg-mlops tune first; or the config's values lie outside tune.space: "
                            "compare two runs instead)")
    seed = seeded[0]
    if seed.state != TrialState.COMPLETE or RUN_ID_ATTR not in seed.user_attrs:
        raise SegMlopsError(f"study '{cfg.experiment}': the seeded trial {seed.number} (the config's own values) "
                            f"ended {seed.state.name}, without a model to compare")
    best = study.best_trial  # the seeded trial is complete: there is one
    return (seed.number, seed.user_attrs[RUN_ID_ATTR]), (best.number, best.user_attrs[RUN_ID_ATTR])
