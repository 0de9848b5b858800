"""MLflow around training: where runs go, the run lifecycle, per-epoch logging, model logging.

The only module (with registry and tuning) that talks to MLflow. Training itself stays plain
Keras: this module wraps `train.train` in a run and adds one callback. No autolog (it would log
everything twice next to our callback).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import keras
import mlflow
import numpy as np

from seg_mlops import config as config_mod
from seg_mlops import data, lifecycle, run_page
from seg_mlops.callbacks import EpochPanels, composite
from seg_mlops.config import Config
from seg_mlops.errors import SegMlopsError
from seg_mlops.spool import Refused, RunSink, server_wait

MODEL_NAME = "model"  # the logged model's name inside a run
MODEL_URI_TAG = "seg_mlops.model_uri"  # the raw Keras network (float32 tensors of the model's size)
PIPELINE_URI_TAG = "seg_mlops.pipeline_uri"  # the whole pipeline (serving.py): what the registry registers
MASK_ENCODING_TAG = "seg_mlops.mask_encoding"  # how binary masks were read (data.prepare decided)
PRECISION_TAG = "seg_mlops.mixed_precision"  # the dtype policy trained with ("auto" decided)
CACHE_TAG = "seg_mlops.data_cache"  # where decoded pairs were kept ("auto" decided)
TRACKING_HOME = Path("tracking")
# MLflow's HTTP client retries a failed call 7 times with backoff (minutes) inside the call; we
# shorten that (unless the user set it) so our spool decides how long to wait, without blocking.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class RunIncomplete(SegMlopsError):
    """The training ended but the tracking server could not store all of it."""


# ----------------------------------------------------------------------------- where runs go

def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the project's sqlite store under ./tracking."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(TRACKING_HOME / 'mlflow.db').resolve()}"


def use_store(create: bool = True) -> str:
    """Point MLflow at the tracking store and return its URI; an unreachable server or (with
    create=False) a missing sqlite file is one clear error, before any work starts. Then runs
    left RUNNING by dead processes of this host are marked FAILED (lifecycle.mark_dead_runs)."""
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
        for name, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(name, value)
    mlflow.set_tracking_uri(uri)
    lifecycle.mark_dead_runs(mlflow.MlflowClient(uri))
    return uri


def connect(experiment: str) -> str:
    """Use the tracking store and return the id of `experiment`, created when missing (with its
    artifacts beside a sqlite store, under tracking/artifacts by default). The experiment carries
    MLflow's experiment-kind tag for model training (unless someone set another kind)."""
    uri = use_store()
    found = mlflow.get_experiment_by_name(experiment)
    kind = {run_page.EXPERIMENT_KIND_TAG: run_page.TRAINING_KIND}
    if found is not None:
        if run_page.EXPERIMENT_KIND_TAG not in found.tags:  # e.g. made by `mlflow run --experiment-name`
            mlflow.MlflowClient().set_experiment_tag(found.experiment_id, *kind.popitem())
        return found.experiment_id
    location = (artifacts_home() / experiment).as_uri() if uri.startswith("sqlite:///") else None
    return mlflow.create_experiment(experiment, artifact_location=location, tags=kind)


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
              killed_by: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
              run_id: str | None = None, system_metrics: bool = False) -> Iterator[mlflow.ActiveRun]:
    """A run in the config's experiment (or the one `mlflow run` created: MLFLOW_RUN_ID, or
    `run_id` to continue a run), ended FINISHED on success, KILLED on Ctrl-C (or `killed_by`, e.g.
    a pruned trial) and FAILED on any other exception. The run's tags name this process, so that
    if it dies unannounced the next command marks the run FAILED: never left RUNNING. With
    `system_metrics`, MLflow samples CPU, memory (and GPU) into `system/*` metrics meanwhile."""
    experiment_id = connect(cfg.experiment)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id,
                           run_id=run_id, log_system_metrics=system_metrics and _can_sample())
    try:
        if run.info.experiment_id != experiment_id:
            print(f"note: logging into run {run.info.run_id} of experiment {run.info.experiment_id} (set by "
                  f"`mlflow run`), not '{cfg.experiment}'; pass --experiment-name {cfg.experiment} to mlflow run")
        # start_run ignores tags when resuming the run of `mlflow run`
        mlflow.set_tags({**(tags or {}), **lifecycle.process_tags()})
        yield run
    except killed_by:
        _end_run("KILLED")
        raise
    except RunIncomplete:
        _end_run("FAILED")  # when the server is still down, the next command marks it FAILED
        raise
    except BaseException:
        _end_run("FAILED")
        raise
    if not _end_run("FINISHED"):
        raise RunIncomplete(f"run {run.info.run_id} could not be marked FINISHED: tracking server "
                            f"{tracking_uri()} unreachable; the next seg-mlops command marks it FAILED")


def _can_sample() -> bool:
    """MLflow's system-metrics monitor needs psutil; without it, one note and no system metrics."""
    import importlib.util

    if importlib.util.find_spec("psutil") is None:
        print("note: no system metrics (train.system_metrics): pip install psutil", file=sys.stderr)
        return False
    return True


def _end_run(status: str) -> bool:
    """End the active run; False (with a note) when the server cannot be told. MLflow pops the
    run from this process's stack before calling the server, so the process stays consistent."""
    try:
        mlflow.end_run(status)
        return True
    except Exception as exc:  # the server is gone: it is reported, the original error wins
        print(f"note: could not mark the run {status} ({type(exc).__name__})", file=sys.stderr)
        return False


# What a run records of its config (one home: training, fold, trial and cross-validation runs).
# MLflow 3.17 prints EVERY param of a run above the picture in each image card (mlflow#23512; the
# per-card "Show run parameters" switch, mlflow#23705, defaults to on and is kept per browser).
# Measured in Chromium (tests/test_browser.py's window): the card's picture sits centred in a
# square as wide as the card, under one ~16 px line per param (the card is too narrow for two),
# so a 1.4:1 picture left room for no param at all, and even a 6:1 picture leaves room for 4,
# fewer than a tune.space holds (our 3:1 pictures, callbacks.MIN_ASPECT, keep room for the two or
# three entry-point params `mlflow run` logs, which we do not control). So a run logs
# no config params: the keys people compare runs by are TAGS named by their key (runs table
# columns, `tags.\`train.learning_rate\` = '0.01'` in the search box), the whole resolved config is
# the config.yaml artifact, and CONFIG_HASH_TAG finds the runs of one config.
COMPARED_KEYS = ("model.image_height", "model.image_width", "model.num_classes", "model.base_filters",
                 "model.num_layers", "model.base_kernels", "model.dilation", "model.dropout_rate",
                 "model.batch_norm", "model.activation", "train.learning_rate", "train.batch_size",
                 "train.epochs", "train.loss", "train.lr_schedule",
                 # read back by the registry's model card and `compare` (run_values)
                 "data.rgb_map", "data.fold", "infer.threshold", "tiled_infer.tile_size",
                 "tiled_infer.overlap", "tiled_infer.mode")
CONFIG_HASH_TAG = "seg_mlops.config_hash"
CONFIG_FILE = "config.yaml"  # the run's whole resolved config (no storage password), as an artifact
_CONFIG_SECTIONS = tuple(f"{section}." for section in config_mod.SECTIONS)


def flat_config(cfg: Config) -> dict[str, str]:
    """Every key of the config (no storage password) as a string, as config.yaml records it."""
    return {k: param_value(v) for k, v in config_mod.flatten(config_mod.public(cfg)).items()}


def recorded_config(run) -> dict[str, str]:
    """The whole config `run` was started with (flat_config): the config.yaml its training wrote
    in its output folder; for a run without one, its params (runs logged before config tags)."""
    out = run.data.tags.get(lifecycle.OUTPUT_TAG)
    if out and (Path(out) / CONFIG_FILE).is_file():
        return flat_config(config_mod.load(Path(out) / CONFIG_FILE))
    return dict(run.data.params)


def compared_values(cfg: Config) -> dict[str, str]:
    """The config keys runs are compared by (COMPARED_KEYS and every key of tune.space, so a
    study's trials compare in the runs table), as tag values."""
    flat = flat_config(cfg)
    return {k: flat[k] for k in dict.fromkeys([*COMPARED_KEYS, *cfg.tune.space])}


def config_hash(cfg: Config) -> str:
    """Hash of the resolved config as logged (config.yaml): equal configs, equal hashes."""
    return hashlib.sha256(json.dumps(flat_config(cfg), sort_keys=True).encode()).hexdigest()[:16]


def config_tags(cfg: Config) -> dict[str, str]:
    """The tags that record a run's config (see COMPARED_KEYS): compared keys and the hash."""
    return {**compared_values(cfg), CONFIG_HASH_TAG: config_hash(cfg)}


def log_config(cfg: Config) -> None:
    """Record the config on the active run: config_tags and the config.yaml artifact."""
    mlflow.set_tags(config_tags(cfg))
    mlflow.log_text(config_mod.to_yaml(config_mod.public(cfg)), CONFIG_FILE)  # no storage password


def run_values(run) -> dict[str, str]:
    """The config values a run recorded: its config tags, over the params of runs logged before
    config tags (and under `mlflow run`, its entry-point params)."""
    tags = {k: v for k, v in run.data.tags.items() if k.startswith(_CONFIG_SECTIONS)}
    return {**run.data.params, **tags}


def param_value(value: object) -> str:
    """A config value as its MLflow param string (lists for tuples)."""
    return str(list(value) if isinstance(value, tuple) else value)


PANELS_KEY = "input-truth-prediction"  # the epoch panels' image key under epoch_infer/ and epoch_tiled_infer/


class MLflowLogger(keras.callbacks.Callback):
    """Per epoch: the epoch's logs (Keras' metrics, `lr`, `epoch_seconds`) at step=epoch, and the
    epoch-inference panels in one picture (callbacks.composite) as the image
    `epoch_infer/input-truth-prediction` (the UI's step slider shows them evolve), and the tiled
    ones as `epoch_tiled_infer/input-truth-prediction`. One picture, not one per image: the UI
    gives every image key its own card, each topped by the run's params.

    With a `sink` (spool.RunSink) the records are uploaded in the background and survive a server
    outage; without one they go through MLflow's asynchronous logging."""

    def __init__(self, panels: EpochPanels, sink: RunSink | None = None):
        super().__init__()
        self.panels, self.sink = panels, sink

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        if self.sink is not None:
            self.sink.log_image(image, key, step)
        else:
            mlflow.log_image(image, key=key, step=step, synchronous=False)

    def on_epoch_end(self, epoch, logs=None):
        # `lr` and `epoch_seconds` are in the logs already: the epoch clock (epoch_clock.EpochClock,
        # which resume.TrainingState is) runs before the extra callbacks this logger is one of.
        metrics = {k: float(v) for k, v in (logs or {}).items()}
        # Asynchronous: the writes/uploads overlap the next epoch (end_run flushes them).
        if self.sink is not None:
            self.sink.log_metrics(metrics, step=epoch)
        else:
            mlflow.log_metrics(metrics, step=epoch, synchronous=False)
        for prefix, source in (("epoch_infer", self.panels.inference), ("epoch_tiled_infer", self.panels.tiled)):
            if source is not None and source.panels:
                self.log_image(composite(list(source.panels.values())), f"{prefix}/{PANELS_KEY}", epoch)


# ----------------------------------------------------------------------------- the model

def serving_copy(model: keras.Model) -> keras.Model:
    """The same network and weights, uncompiled: it loads anywhere without our custom losses."""
    copy = keras.Model.from_config(model.get_config())  # clone_model would copy the compile config
    copy.set_weights(model.get_weights())
    return copy


def log_model(model: keras.Model, cfg: Config | None = None) -> str:
    """Log the Keras 3 model with an explicit signature (raw 0..255 pixels in, probabilities out)
    and explicit pip requirements; returns its models:/ URI. With `cfg`, also log the segmentation
    pipeline beside it (serving.log_pipeline: encoded images of any size in, masks out), tagged
    PIPELINE_URI_TAG: the model the registry registers."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from seg_mlops import serving

    _, height, width, channels = model.input_shape
    classes = model.output_shape[-1]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, height, width, channels), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, height, width, classes), "mask")]))
    tf_dist = "tensorflow-cpu" if _version("tensorflow-cpu") != "none" else "tensorflow"
    requirements = [f"{tf_dist}=={_version(tf_dist)}", f"keras=={_version('keras')}",
                    f"numpy=={_version('numpy')}"]
    copy = serving_copy(model)
    info = mlflow.keras.log_model(copy, name=MODEL_NAME, signature=signature, pip_requirements=requirements)
    mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
    if cfg is not None:
        mlflow.set_tag(PIPELINE_URI_TAG, serving.log_pipeline(copy, cfg))
    return info.model_uri


def load_model(uri_or_path: str):
    """A Keras model from a local .keras file or any MLflow model URI (models:/, runs:/, ...): the
    raw network, or the network inside a pipeline model (what the registry holds)."""
    from seg_mlops import serving
    from seg_mlops.infer import load_model as load_file

    if "://" not in uri_or_path and ":/" not in uri_or_path:
        return load_file(uri_or_path)
    use_store()
    try:
        flavors = mlflow.models.get_model_info(uri_or_path).flavors
        if "keras" in flavors:
            return mlflow.keras.load_model(uri_or_path)
        return load_file(serving.keras_file(mlflow.artifacts.download_artifacts(uri_or_path)))
    except Exception as exc:  # MlflowException, OSError...: the user needs the URI and the reason
        raise SegMlopsError(f"cannot load model {uri_or_path}: {str(exc).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- tracked jobs

def log_artifacts(out_dir: Path, names: Sequence[str]) -> None:
    for name in names:
        if (out_dir / name).exists():
            mlflow.log_artifact(str(out_dir / name))


def log_evaluation(results: dict[str, float], out_dir: Path, *, dataset=None, model_id: str | None = None) -> None:
    """The test metrics (`test_<name>`), linked to the test split's dataset and to the logged
    model when given (MLflow 3 lists them on the model: the Models tab ranks models by them)."""
    mlflow.log_metrics({f"test_{k}": v for k, v in results.items()}, dataset=dataset, model_id=model_id)
    log_artifacts(out_dir, ["evaluation.csv", "per_image.csv"])


def train(cfg: Config, *, overwrite: bool = False, extra_callbacks: Sequence[keras.callbacks.Callback] = (),
          run_name: str | None = None, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
          killed_by: tuple[type[BaseException], ...] = (KeyboardInterrupt,), resume_run_id: str | None = None,
          score_test: bool = True):
    """Train inside an MLflow run: the config (log_config), tags, per-epoch metrics and panels,
    the history files, `best_<monitor>`, test-split evaluation and the model. Returns
    (TrainResult, run_id).

    Args:
        cfg: the experiment config (for a resume: the run's config, see `resume_config`).
        overwrite: reuse an output folder that already holds a model.
        extra_callbacks: Keras callbacks after ours (e.g. pruning).
        run_name, parent_run_id, tags: of the new run.
        killed_by: exceptions that end the run KILLED rather than FAILED.
        resume_run_id: continue this run (FAILED or KILLED) from the training state in its output
            folder, logging into it with continuous steps.
        score_test: evaluate the model on the test split at the end; False for a study's trials,
            whose test scores nobody should pick on (the study scores its best, `score_run`).

    Raises:
        RunIncomplete: the training ended but the tracking server stayed unreachable for
            $SEG_MLOPS_SERVER_WAIT seconds: the files stay in the output folder, and
            `seg-mlops train --resume <run_id>` uploads them later.

    On a non-chief worker of a multi_worker run it only trains (its share of every step) and
    returns (TrainResult, None): no MLflow run, so the chief's run is the only one.
    """
    from seg_mlops import resume as resume_mod
    from seg_mlops import train as train_mod

    if not train_mod.is_chief(cfg):
        return train_mod.train(cfg, overwrite=overwrite, extra_callbacks=list(extra_callbacks)), None

    wrapper = None
    if resume_run_id:
        # Under `mlflow run -P resume=<id>`, MLflow made a new run for this command: log into the
        # resumed run instead, and leave the wrapper a tag pointing at it (mlflow run ends it).
        wrapper = os.environ.pop("MLFLOW_RUN_ID", None)
    out = cfg.output_dir.resolve()
    with start_run(cfg, run_name=run_name, parent_run_id=parent_run_id, run_id=resume_run_id,
                   tags={**run_tags(cfg), **(tags or {}), lifecycle.OUTPUT_TAG: str(out)},
                   killed_by=killed_by, system_metrics=cfg.train.system_metrics) as run:
        run_id = run.info.run_id
        if wrapper and wrapper != run_id:
            mlflow.MlflowClient().set_tag(wrapper, lifecycle.RESUMED_RUN_TAG, run_id)
        log_config(cfg)
        state = resume_mod.load_state(out) if resume_run_id else None
        if resume_run_id:
            count = int(run.data.tags.get(lifecycle.RESUMES_TAG, "0")) + 1
            mlflow.set_tag(lifecycle.RESUMES_TAG, str(count))
            if state is not None and state.owner != run_id:
                raise SegMlopsError(f"{out} holds the training state of run {state.owner}, not {run_id}: "
                                    "the folder was reused by another training")
        sink = RunSink(run_id, out, replay=bool(resume_run_id))
        try:
            if state is not None:
                republish(sink, run_id, state.rows)
            result = train_mod.train(cfg, overwrite=overwrite, resume=bool(resume_run_id), owner=run_id,
                                     panel_logger=lambda panels, saved: MLflowLogger(panels, sink.gated(saved)),
                                     extra_callbacks=list(extra_callbacks))
            finish_run(cfg, result, sink, run_id, score_test)
        except BaseException:
            # What was logged before the error still reaches the run. The original error wins: a
            # refusal found here was printed by the sink when it happened.
            with contextlib.suppress(Refused):
                sink.flush(min(30.0, server_wait()))
            raise
        finally:
            sink.close()
    resume_mod.clear_state(out)  # FINISHED on the server: nothing left to resume
    return result, run_id


def republish(sink: RunSink, run_id: str, rows: Sequence[dict]) -> int:
    """Queue the saved epochs' metrics that the server lacks (the process died between saving an
    epoch and uploading it, or the server was down); returns how many (step, metric) were missing.
    Checks the server first, so a metric is never stored twice at one step."""
    client = mlflow.MlflowClient()
    # ("learning_rate": states saved before epoch_clock named the LR `lr` only)
    names = {k for row in rows for k in row if k not in ("epoch", "learning_rate")}
    present = {name: {m.step for m in client.get_metric_history(run_id, name)} for name in names}
    missing = 0
    for row in rows:
        values = {k: v for k, v in row.items() if k in names and row["epoch"] not in present[k]}
        if values:
            sink.log_metrics(values, step=row["epoch"])
            missing += len(values)
    return missing


def finish_run(cfg: Config, result, sink: RunSink, run_id: str, score_test: bool = True) -> None:
    """The end of a tracked training: evaluate locally (unless not `score_test`), then upload the
    pending epochs, `best_<monitor>`, config, history files, model and evaluation, retrying while
    the server is down, up to $SEG_MLOPS_SERVER_WAIT seconds in all; past that, RunIncomplete."""
    from seg_mlops import losses

    out = result.output_dir
    values = result.history[cfg.train.monitor]
    best = losses.best_value(values, cfg.train.monitor)
    # local files first: they never need the server; the config as trained (mask encoding decided)
    trained = result.cfg or cfg
    scores = test_scores(result.model, trained, out) if score_test else None
    datasets = run_page.split_datasets(trained, result.profile) if result.profile is not None else {}
    end_tags = {"seg_mlops.replicas": str(result.replicas),
                "seg_mlops.global_batch_size": str(result.replicas * cfg.train.batch_size),
                PRECISION_TAG: trained.train.mixed_precision, CACHE_TAG: trained.data.cache,
                run_page.NOTE_TAG: run_page.run_description(trained, result.profile, result.history,
                                                            scores[0] if scores else {})}
    if result.profile is not None:
        end_tags[MASK_ENCODING_TAG] = result.profile.encoding
    model_uri: list[str] = []  # the logged model's URI once uploaded (its id links the test metrics)
    wait = server_wait()
    deadline = time.monotonic() + wait
    steps = [
        ("epoch records", lambda: sink.flush(max(0.0, deadline - time.monotonic())) == 0 or _raise_pending(sink)),
        (f"best_{cfg.train.monitor}", lambda: mlflow.log_metric(f"best_{cfg.train.monitor}", best)),
        ("tags", lambda: mlflow.set_tags(end_tags)),
        ("history files", lambda: log_artifacts(out, ["train_losses.csv", "train_losses.png",
                                                      "train_metrics.csv", "train_metrics.png",
                                                      "dataset_profile.json"])),
        ("datasets", lambda: datasets and run_page.log_datasets(datasets)),
        ("model", lambda: model_uri.append(log_model(result.model, result.cfg or cfg))),
    ]
    if scores is not None:
        steps.append(("evaluation", lambda: log_test_scores(scores, out, datasets.get("test"), model_uri[-1])))
    for what, upload in steps:
        done, _ = sink.call(what, upload, deadline)
        if not done:
            raise RunIncomplete(
                f"run {run_id} is incomplete: tracking server {tracking_uri()} unreachable for {wait:.0f} s "
                f"({what} not uploaded); the model and files are kept in {out}; when the server is back, "
                f"upload them with: seg-mlops train --resume {run_id}")


def test_scores(model, cfg: Config, out: Path) -> tuple[dict[str, float], dict, list]:
    """The test split's scores (evaluate.py: evaluation.csv, per_image.csv in `out`) and the
    per-image review table with its worst images (run_page.review)."""
    from seg_mlops import evaluate

    results = evaluate.evaluate(model, cfg, out)
    table, worst = run_page.review(model, cfg, out)
    return results, table, worst


def log_test_scores(scores: tuple[dict[str, float], dict, list], out: Path, dataset, model_uri: str) -> None:
    """Log what test_scores computed into the active run: `test_*` metrics linked to the test
    dataset and the logged model, the CSVs, the review table and worst images."""
    results, table, worst = scores
    log_evaluation(results, out, dataset=dataset, model_id=model_id(model_uri))
    run_page.log_review(table, worst)


def as_trained(cfg: Config, run) -> Config:
    """`cfg` with data.binary_mask as `run`'s validation pass decided it (its tag), so a later
    scoring reads the masks as its training did; with no tag, "auto" lets evaluate decide from
    the test split."""
    encoding = run.data.tags.get(MASK_ENCODING_TAG)
    if cfg.model.num_classes > 1 or cfg.data.binary_mask != "auto" or not encoding:
        return cfg
    return config_mod.override(cfg, {"data.binary_mask": encoding})


def score_run(run_id: str, cfg: Config) -> dict[str, float]:
    """Score a FINISHED run's logged model on the test split after the fact, into that run (a
    study scores its best trial so; the trials themselves skip the test split). `cfg` is the run's
    own config (a trial's: tuning.trial_config). A run already scored keeps its numbers: its
    logged `test_*` values are returned."""
    run = mlflow.MlflowClient().get_run(run_id)
    logged = {k.removeprefix("test_"): v for k, v in run.data.metrics.items() if k.startswith("test_")}
    if logged:
        return logged
    model_uri = run.data.tags.get(MODEL_URI_TAG)
    if model_uri is None:
        raise SegMlopsError(f"run {run_id} has no logged model (tag {MODEL_URI_TAG}): nothing to score")
    cfg = as_trained(cfg, run)
    out = cfg.output_dir / "test-scores"
    scores = test_scores(load_model(model_uri), cfg, out)
    with mlflow.start_run(run_id=run_id):  # reopened to log into it; ends FINISHED again
        log_test_scores(scores, out, None, model_uri)
    return scores[0]


def model_id(model_uri: str) -> str | None:
    """The LoggedModel id of a `models:/<id>` URI (MLflow 3), else None."""
    rest = model_uri.removeprefix("models:/")
    return rest if rest != model_uri and "/" not in rest and "@" not in rest else None


def _raise_pending(sink: RunSink) -> bool:
    raise ConnectionError(f"{len(sink.pending)} epoch records still pending")


def resume_config(run_id: str, cfg: Config | None = None) -> Config:
    """The config to resume `run_id` with: `cfg` if given (it must match the run's whole config,
    recorded_config), else
    the run's own (config.yaml in its output folder). Errors name what prevents the resume."""
    client = mlflow.MlflowClient(use_store())
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise SegMlopsError(f"run {run_id} not found in {tracking_uri()}") from None
    out = run.data.tags.get(lifecycle.OUTPUT_TAG)
    if cfg is None:
        if not out or not (Path(out) / "config.yaml").is_file():
            raise SegMlopsError(f"run {run_id}: no config.yaml in its output folder {out}; pass --config")
        cfg = config_mod.load(Path(out) / "config.yaml")
    out_dir = lifecycle.check_resumable(run, connect(cfg.experiment), flat_config(cfg), recorded_config(run))
    # The folder the run wrote to, wherever this command runs from.
    return config_mod.override(cfg, {"train.output_dir": str(out_dir)})
