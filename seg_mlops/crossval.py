"""K-fold cross-validation and fold ensembles: one MLflow parent run, one ordinary training run per
fold under it, and the fold models averaged into one model.

A fold run is a plain `tracking.train` whose config names its fold (`data.fold`; data.split_pairs
makes the split), so its config.yaml reproduces it and the resume machinery works per fold. The
parent holds what only the folds together say: `fold_best_<monitor>` per fold (step = fold),
`cv_mean_<monitor>` and `cv_std_<monitor>` (sample standard deviation, ddof=1), a summary plot,
the fold ensemble (model.average_models) logged with tracking.log_model, its test evaluation
(`test_*`) and cv_summary.csv (each fold model's test scores and the ensemble's). It never logs
`best_<monitor>`: the ensemble has no honest validation value (each fold model saw the other
folds' validation images), and registry.best_run ranks runs on it.

A relaunch of the same config finds its unfinished parent (tag: a hash of the resolved config),
skips FINISHED folds and resumes a FAILED or KILLED fold run from its saved state.
"""

from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import keras
import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Run

from seg_mlops import config as config_mod
from seg_mlops import lifecycle, run_page, tracking
from seg_mlops.config import Config
from seg_mlops.errors import SegMlopsError

FOLD_TAG = "seg_mlops.fold"  # on a fold run: which fold it validates on
CV_KEY_TAG = "seg_mlops.cv_key"  # on a parent: hash of the resolved config (a relaunch finds it)
CV_FOLDS_TAG = "seg_mlops.cv_folds"  # on a parent: k
SUMMARY_FILE = "cv_summary.csv"
PLOT_FILE = "cv_summary.png"
ENSEMBLE_FILE = "ensemble.keras"


@dataclass(frozen=True)
class Fold:
    """One trained fold, as its FINISHED run records it."""

    index: int
    run_id: str
    best: float  # the run's best_<monitor>
    output_dir: Path
    test: dict[str, float]  # the fold model's test_* metrics


@dataclass
class CVResult:
    parent_run_id: str
    monitor: str
    folds: list[Fold]
    mean: float
    std: float  # sample standard deviation (ddof=1) of the folds' best values
    ensemble_test: dict[str, float] = field(default_factory=dict)  # test_* of the fold ensemble
    model_uri: str | None = None  # the ensemble's logged model


def fold_config(cfg: Config, fold: int) -> Config:
    """The config of fold `fold`'s run: it validates on that fold, writes to <output>/folds/fold-<i>."""
    return config_mod.override(cfg, {"data.fold": fold,
                                     "train.output_dir": str(cfg.output_dir / "folds" / f"fold-{fold}")})


def cv_key(cfg: Config) -> str:
    """Hash of the resolved config: the same command relaunched finds its parent by it."""
    return tracking.config_hash(cfg)


def test_key(monitor: str) -> str:
    """The test-split counterpart of the monitored metric (val_dice_coef -> test_dice_coef)."""
    return "test_" + monitor.removeprefix("val_")


# ----------------------------------------------------------------------------- the parent run

def run_cv(cfg: Config, *, overwrite: bool = False,
           fold_callbacks: Callable[[int], Sequence[keras.callbacks.Callback]] | None = None) -> CVResult:
    """Cross-validate `cfg` (data.folds >= 2, data.fold -1): train every fold under one parent run,
    then log the fold ensemble with its test evaluation. A relaunch continues the unfinished
    parent of the same config at its first unfinished fold.

    Args:
        cfg: the experiment config.
        overwrite: train again a config whose cross-validation already FINISHED (replaces its files).
        fold_callbacks: extra Keras callbacks for the run of fold i (e.g. a test's interruption).
    """
    if cfg.data.folds < 2 or cfg.data.fold != -1:
        raise SegMlopsError(f"cross-validation needs data.folds >= 2 and data.fold=-1, got data.folds="
                            f"{cfg.data.folds}, data.fold={cfg.data.fold}")
    parent_id = find_or_create_parent(cfg, tracking.connect(cfg.experiment), overwrite)
    return in_parent(cfg, parent_id, overwrite=overwrite, fold_callbacks=fold_callbacks)


def find_or_create_parent(cfg: Config, experiment_id: str, overwrite: bool) -> str:
    """The unfinished parent run of this config (FAILED, KILLED, or left RUNNING by a dead
    process), reopened; else a new one (under `mlflow run`: the entry point's run)."""
    client = MlflowClient()
    wrapper = os.environ.pop("MLFLOW_RUN_ID", None)  # folds must not log into `mlflow run`'s run
    found = client.search_runs([experiment_id], f"tags.`{CV_KEY_TAG}` = '{cv_key(cfg)}'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    last = found[0] if found else None
    if last is None or (last.info.status == "FINISHED" and overwrite):
        return create_parent(cfg, experiment_id, run_name=f"cv-{cfg.data.folds}-folds", run_id=wrapper)
    run_id = last.info.run_id
    if last.info.status == "FINISHED":
        raise SegMlopsError(f"the cross-validation of this config is FINISHED (run {run_id}, files in "
                            f"{cfg.output_dir}); pass --overwrite to train it again, or change the config")
    if last.info.status == "RUNNING" and lifecycle.process_alive(last.data.tags):
        raise SegMlopsError(f"cross-validation run {run_id} is still RUNNING in process "
                            f"{last.data.tags.get(lifecycle.PID_TAG)}: stop it before relaunching")
    client.update_run(run_id, status="RUNNING")
    for key, value in lifecycle.process_tags().items():
        client.set_tag(run_id, key, value)
    if wrapper and wrapper != run_id:
        client.set_tag(wrapper, lifecycle.RESUMED_RUN_TAG, run_id)
    print(f"continuing cross-validation run {run_id} ({last.info.status}): FINISHED folds are not retrained")
    return run_id


def create_parent(cfg: Config, experiment_id: str, *, run_name: str, parent_run_id: str | None = None,
                  tags: dict[str, str] | None = None, run_id: str | None = None) -> str:
    """A parent run for the folds of `cfg` (or `run_id`, given those tags): the run's tags, the
    config's hash and k, this process (so a kill gets it marked FAILED), and the config
    (tracking.config_tags, config.yaml)."""
    client = MlflowClient()
    all_tags = {**tracking.run_tags(cfg), **tracking.config_tags(cfg), CV_KEY_TAG: cv_key(cfg), CV_FOLDS_TAG: str(cfg.data.folds),
                run_page.NOTE_TAG: f"{cfg.data.folds}-fold cross-validation of '{cfg.experiment}': one child run "
                                   f"per fold; the model is the fold ensemble (mean of the fold models' "
                                   f"probabilities), scored on the test split",
                **(tags or {}), **lifecycle.process_tags()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
    else:
        for key, value in all_tags.items():
            client.set_tag(run_id, key, value)
    client.log_text(run_id, config_mod.to_yaml(config_mod.public(cfg)), tracking.CONFIG_FILE)
    return run_id


@contextlib.contextmanager
def ends(run_id: str, killed_by: tuple[type[BaseException], ...]) -> Iterator[None]:
    """End the parent run KILLED (on `killed_by`) or FAILED when the block raises."""
    try:
        yield
    except killed_by:
        MlflowClient().set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        MlflowClient().set_terminated(run_id, "FAILED")
        raise


def in_parent(cfg: Config, parent_id: str, *, overwrite: bool = False,
              fold_callbacks: Callable[[int], Sequence[keras.callbacks.Callback]] | None = None,
              after_fold: Callable[[Fold], None] | None = None, score_test: bool = True,
              killed_by: tuple[type[BaseException], ...] = (KeyboardInterrupt,)) -> CVResult:
    """Train the folds of `cfg` under `parent_id`, then log the ensemble; the parent ends FINISHED,
    or KILLED / FAILED when something raises (`after_fold` may: a pruned trial). Without
    `score_test` (a study's trial) neither the fold models nor the ensemble see the test split."""
    with ends(parent_id, killed_by):
        folds = train_folds(cfg, parent_id, overwrite=overwrite, fold_callbacks=fold_callbacks,
                            after_fold=after_fold, score_test=score_test)
        return finish(cfg, parent_id, folds, killed_by, score_test)


# ----------------------------------------------------------------------------- the folds

def children(client: MlflowClient, parent_id: str) -> dict[int, Run]:
    """The latest fold run of each fold under `parent_id`."""
    experiment_id = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                              order_by=["attributes.start_time ASC"], max_results=1000)
    return {int(r.data.tags[FOLD_TAG]): r for r in runs if FOLD_TAG in r.data.tags}


def train_folds(cfg: Config, parent_id: str, *, overwrite: bool = False,
                fold_callbacks: Callable[[int], Sequence[keras.callbacks.Callback]] | None = None,
                after_fold: Callable[[Fold], None] | None = None, score_test: bool = True) -> list[Fold]:
    """Each fold in order: skipped when its run FINISHED, resumed when it FAILED or was KILLED,
    trained otherwise; its best value logged on the parent as fold_best_<monitor> at step=fold."""
    client = MlflowClient()
    found = children(client, parent_id)
    folds = []
    for i in range(cfg.data.folds):
        callbacks = list(fold_callbacks(i)) if fold_callbacks else []
        fold = train_fold(cfg, i, parent_id, found.get(i), overwrite=overwrite, callbacks=callbacks,
                          score_test=score_test)
        name = f"fold_best_{cfg.train.monitor}"
        if i not in {m.step for m in client.get_metric_history(parent_id, name)}:
            client.log_metric(parent_id, name, fold.best, step=i)
        folds.append(fold)
        if after_fold is not None:
            after_fold(fold)
    return folds


def train_fold(cfg: Config, i: int, parent_id: str, run: Run | None, *, overwrite: bool,
               callbacks: Sequence[keras.callbacks.Callback], score_test: bool = True) -> Fold:
    """Fold `i`: its FINISHED run as it is, its FAILED/KILLED run continued from its state (the same
    run id), or a new child run of the parent."""
    fold_cfg = fold_config(cfg, i)
    keras.backend.clear_session()  # the folds share the process: free the previous fold's graph
    if run is not None and run.info.status == "FINISHED":
        print(f"fold {i}: run {run.info.run_id} FINISHED, not retrained")
        return fold_of(i, run, cfg.train.monitor)
    if run is not None:
        try:
            resumed = tracking.resume_config(run.info.run_id, fold_cfg)
        except SegMlopsError as exc:  # e.g. trained on another host: train the fold afresh
            print(f"note: fold {i}: {exc}; training it afresh")
        else:
            print(f"fold {i}: continuing run {run.info.run_id} ({run.info.status})")
            _, run_id = tracking.train(resumed, resume_run_id=run.info.run_id, extra_callbacks=callbacks,
                                       score_test=score_test)
            return fold_of(i, MlflowClient().get_run(run_id), cfg.train.monitor)
    print(f"fold {i} of {cfg.data.folds}: training")
    _, run_id = tracking.train(fold_cfg, overwrite=overwrite or run is not None, run_name=f"fold-{i}",
                               parent_run_id=parent_id, tags={FOLD_TAG: str(i)}, extra_callbacks=callbacks,
                               score_test=score_test)
    return fold_of(i, MlflowClient().get_run(run_id), cfg.train.monitor)


def fold_of(i: int, run: Run, monitor: str) -> Fold:
    metrics = run.data.metrics
    return Fold(i, run.info.run_id, metrics.get(f"best_{monitor}", float("nan")),
                Path(run.data.tags[lifecycle.OUTPUT_TAG]),
                {k: v for k, v in metrics.items() if k.startswith("test_")})


# ----------------------------------------------------------------------------- the ensemble

def load_ensemble(folds: Sequence[Fold]) -> keras.Model:
    """The fold models (each fold's best checkpoint) averaged into one model."""
    from seg_mlops.infer import load_model
    from seg_mlops.model import average_models
    from seg_mlops.train import MODEL_FILE

    return average_models([load_model(fold.output_dir / MODEL_FILE) for fold in folds])


def finish(cfg: Config, parent_id: str, folds: list[Fold],
           killed_by: tuple[type[BaseException], ...] = (KeyboardInterrupt,), score_test: bool = True) -> CVResult:
    """Log on the parent: cv_mean/cv_std of the folds' best values, the summary plot, the fold
    ensemble (model + pipeline), its test evaluation (when `score_test`) and cv_summary.csv; the
    parent ends FINISHED."""
    monitor = cfg.train.monitor
    bests = [fold.best for fold in folds]
    mean, std = float(np.mean(bests)), float(np.std(bests, ddof=1))
    out = cfg.output_dir / "ensemble"
    out.mkdir(parents=True, exist_ok=True)
    ensemble = load_ensemble(folds)
    ensemble.save(out / ENSEMBLE_FILE)
    from seg_mlops import evaluate

    # the encoding the folds' validation pass decided, so the ensemble reads masks as they did
    trained = tracking.as_trained(cfg, MlflowClient().get_run(folds[0].run_id))
    results = evaluate.evaluate(ensemble, trained, out) if score_test else {}  # local: no server needed
    plot_summary(bests, monitor, out / PLOT_FILE)
    write_summary(folds, results, monitor, parent_id, out / SUMMARY_FILE)
    with tracking.start_run(cfg, run_id=parent_id, killed_by=killed_by):
        mlflow.log_metrics({f"cv_mean_{monitor}": mean, f"cv_std_{monitor}": std})
        model_uri = tracking.log_model(ensemble, trained)
        if score_test:
            tracking.log_evaluation(results, out, model_id=tracking.model_id(model_uri))
        tracking.log_artifacts(out, [SUMMARY_FILE, PLOT_FILE])
    return CVResult(parent_id, monitor, folds, mean, std, {f"test_{k}": v for k, v in results.items()}, model_uri)


def write_summary(folds: Sequence[Fold], results: dict[str, float], monitor: str, parent_id: str,
                  path: Path) -> None:
    """cv_summary.csv: one row per fold model and one for the ensemble; its best_<monitor> (empty
    for the ensemble: it has no honest validation value) and every test metric."""
    names = [f"test_{k}" for k in results]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "run_id", f"best_{monitor}", *names])
        for fold in folds:
            writer.writerow([f"fold-{fold.index}", fold.run_id, f"{fold.best:.6f}",
                             *(f"{fold.test[n]:.6f}" if n in fold.test else "" for n in names)])
        writer.writerow(["ensemble", parent_id, "", *(f"{results[n[5:]]:.6f}" for n in names)])


def plot_summary(bests: Sequence[float], monitor: str, path: Path) -> None:
    """Per-fold best values as bars, their mean as a line and mean ± sample std as a band."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    mean, std = float(np.mean(bests)), float(np.std(bests, ddof=1))
    figure, axes = plt.subplots(figsize=(1.2 * len(bests) + 3, 3.5))
    axes.bar([f"fold {i}" for i in range(len(bests))], bests, color="#4c72b0")
    axes.axhline(mean, color="black", label=f"mean {mean:.4f}")
    axes.axhspan(mean - std, mean + std, color="grey", alpha=0.25, label=f"± std {std:.4f} (ddof=1)")
    axes.set_ylabel(f"best {monitor}")
    axes.set_title(f"{len(bests)}-fold cross-validation")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
