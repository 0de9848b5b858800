"""MLflow around training: where runs go, the run lifecycle, per-epoch logging, model logging.

The only module (with registry and tuning) that talks to MLflow. Training itself stays plain
Keras: this module wraps `train.train` in a run and adds one callback. No autolog (it would log
everything twice next to our callback).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator, Sequence

import keras
import mlflow
import numpy as np

from seg_mlops import config as config_mod
from seg_mlops import data
from seg_mlops.callbacks import PanelConsumer
from seg_mlops.config import Config
from seg_mlops.errors import SegMlopsError

MODEL_NAME = "model"  # the logged model's name inside a run
MODEL_URI_TAG = "seg_mlops.model_uri"
TRACKING_HOME = Path("tracking")


# ----------------------------------------------------------------------------- where runs go

def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the project's sqlite store under ./tracking."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(TRACKING_HOME / 'mlflow.db').resolve()}"


def use_store(create: bool = True) -> str:
    """Point MLflow at the tracking store and return its URI; an unreachable server or (with
    create=False) a missing sqlite file is one clear error, before any work starts."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not create and not path.is_file():
            raise SegMlopsError(f"no tracking store at {uri}: train first (seg-mlops train)")
        path.parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except requests.RequestException as exc:
            raise SegMlopsError(f"tracking server {uri} is unreachable ({type(exc).__name__}); start it "
                                f"(seg-mlops ui) or fix MLFLOW_TRACKING_URI") from None
    mlflow.set_tracking_uri(uri)
    return uri


def connect(experiment: str) -> str:
    """Use the tracking store and return the id of `experiment`, created when missing (with its
    artifacts beside a sqlite store, under tracking/artifacts by default)."""
    uri = use_store()
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = (artifacts_home() / experiment).as_uri() if uri.startswith("sqlite:///") else None
    return mlflow.create_experiment(experiment, artifact_location=location)


def artifacts_home() -> Path:
    """Local artifacts sit beside the sqlite store (tracking/artifacts for the default one)."""
    uri = tracking_uri()
    base = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else TRACKING_HOME
    return (base / "artifacts").resolve()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def run_tags(cfg: Config) -> dict[str, str]:
    tags = {"seg_mlops.dataset_fingerprint": data.fingerprint(cfg), "seg_mlops.seed": str(cfg.seed),
            "seg_mlops.experiment": cfg.experiment}
    for dist in ("seg-mlops", "tensorflow", "tensorflow-cpu", "keras", "mlflow"):
        tags[f"version.{dist}"] = _version(dist)
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    return tags


# ----------------------------------------------------------------------------- run lifecycle

@contextlib.contextmanager
def start_run(cfg: Config, *, run_name: str | None = None, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None,
              killed_by: tuple[type[BaseException], ...] = (KeyboardInterrupt,)) -> Iterator[mlflow.ActiveRun]:
    """A run in the config's experiment (or the one `mlflow run` created: MLFLOW_RUN_ID), ended
    FINISHED on success, KILLED on Ctrl-C (or `killed_by`, e.g. a pruned trial) and FAILED on any
    other exception: never left RUNNING."""
    experiment_id = connect(cfg.experiment)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id)
    try:
        if run.info.experiment_id != experiment_id:
            print(f"note: logging into run {run.info.run_id} of experiment {run.info.experiment_id} (set by "
                  f"`mlflow run`), not '{cfg.experiment}'; pass --experiment-name {cfg.experiment} to mlflow run")
        mlflow.set_tags(tags or {})  # start_run ignores tags when resuming the run of `mlflow run`
        yield run
    except killed_by:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def log_params_once(params: dict[str, object]) -> None:
    """Log params not yet on the active run. MLflow params are write-once, and under `mlflow run`
    the entry-point params are already there: re-logging one with another value is an error."""
    run_id = mlflow.active_run().info.run_id
    existing = mlflow.get_run(run_id).data.params
    fresh = {k: str(list(v) if isinstance(v, tuple) else v) for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)


class MLflowLogger(PanelConsumer):
    """Per epoch: Keras' metrics, the learning rate and epoch_seconds at step=epoch, and the
    epoch-inference panels as `epoch_infer/<stem>` images (the UI's step slider shows them evolve)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        metrics = {k: float(v) for k, v in (logs or {}).items()}
        metrics["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        metrics["epoch_seconds"] = time.perf_counter() - self._start
        metrics.pop("learning_rate", None)  # logged as lr: one name per concept
        # Asynchronous: the writes/uploads overlap the next epoch (end_run flushes them).
        mlflow.log_metrics(metrics, step=epoch, synchronous=False)
        if self.source is not None:
            for stem, panel in self.source.panels.items():
                mlflow.log_image(panel, key=f"epoch_infer/{stem}", step=epoch, synchronous=False)


# ----------------------------------------------------------------------------- the model

def serving_copy(model: keras.Model) -> keras.Model:
    """The same network and weights, uncompiled: it loads anywhere without our custom losses."""
    copy = keras.Model.from_config(model.get_config())  # clone_model would copy the compile config
    copy.set_weights(model.get_weights())
    return copy


def log_model(model: keras.Model) -> str:
    """Log the Keras 3 model with an explicit signature (raw 0..255 pixels in, probabilities out)
    and explicit pip requirements; returns its models:/ URI."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    _, height, width, channels = model.input_shape
    classes = model.output_shape[-1]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, height, width, channels), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, height, width, classes), "mask")]))
    tf_dist = "tensorflow-cpu" if _version("tensorflow-cpu") != "none" else "tensorflow"
    requirements = [f"{tf_dist}=={_version(tf_dist)}", f"keras=={_version('keras')}",
                    f"numpy=={_version('numpy')}"]
    info = mlflow.keras.log_model(serving_copy(model), name=MODEL_NAME, signature=signature,
                                  pip_requirements=requirements)
    mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
    return info.model_uri


def load_model(uri_or_path: str):
    """A model from a local .keras file or any MLflow model URI (models:/, runs:/, ...)."""
    from seg_mlops.infer import load_model as load_file

    if "://" not in uri_or_path and ":/" not in uri_or_path:
        return load_file(uri_or_path)
    use_store()
    try:
        return mlflow.keras.load_model(uri_or_path)
    except Exception as exc:  # MlflowException, OSError...: the user needs the URI and the reason
        raise SegMlopsError(f"cannot load model {uri_or_path}: {str(exc).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- tracked jobs

def log_artifacts(out_dir: Path, names: Sequence[str]) -> None:
    for name in names:
        if (out_dir / name).exists():
            mlflow.log_artifact(str(out_dir / name))


def log_evaluation(results: dict[str, float], out_dir: Path) -> None:
    mlflow.log_metrics({f"test_{k}": v for k, v in results.items()})
    log_artifacts(out_dir, ["evaluation.csv", "per_image.csv"])


def train(cfg: Config, *, overwrite: bool = False, extra_callbacks: Sequence[keras.callbacks.Callback] = (),
          run_name: str | None = None, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
          killed_by: tuple[type[BaseException], ...] = (KeyboardInterrupt,)):
    """Train inside an MLflow run: params, tags, per-epoch metrics and panels, the history files,
    `best_<monitor>`, test-split evaluation and the model. Returns (TrainResult, run_id)."""
    from seg_mlops import evaluate, losses
    from seg_mlops import train as train_mod

    with start_run(cfg, run_name=run_name, parent_run_id=parent_run_id, tags={**run_tags(cfg), **(tags or {})},
                   killed_by=killed_by) as run:
        log_params_once(config_mod.flatten(config_mod.public(cfg)))  # no storage password
        result = train_mod.train(cfg, overwrite=overwrite, extra_callbacks=[MLflowLogger(), *extra_callbacks])
        values = result.history[cfg.train.monitor]
        best = (min if losses.monitor_mode(cfg.train.monitor) == "min" else max)(values)
        mlflow.log_metric(f"best_{cfg.train.monitor}", best)
        mlflow.log_text(config_mod.to_yaml(config_mod.public(cfg)), "config.yaml")
        log_artifacts(result.output_dir, ["train_losses.csv", "train_losses.png",
                                          "train_metrics.csv", "train_metrics.png"])
        log_evaluation(evaluate.evaluate(result.model, cfg, result.output_dir), result.output_dir)
        log_model(result.model)
        return result, run.info.run_id
