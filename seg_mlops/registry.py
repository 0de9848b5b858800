"""Model registry: register an experiment's best trained run as `seg-<experiment>` and gate promotion.

Aliases: `candidate` is the latest registered version; `champion` moves only when the candidate
beats it on the monitored metric (or when forced). Serving and inference load
`models:/seg-<experiment>@champion`, so they follow promotions without a code change.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from seg_mlops import losses, run_page, tracking
from seg_mlops.config import Config
from seg_mlops.errors import SegMlopsError

CHAMPION = "champion"
CANDIDATE = "candidate"
# Run tags that tuning sets on trial runs; copied to the version so it says which trial it is.
STUDY_TAG = "seg_mlops.study"
TRIAL_TAG = "seg_mlops.trial"
# Only training runs that finished and logged a model can be registered.
_REGISTRABLE = f"attributes.status = 'FINISHED' and tags.`{tracking.MODEL_URI_TAG}` IS NOT NULL"


@dataclass(frozen=True)
class RegisterResult:
    """What `register_best` did.

    `promoted` is True when the version is the champion after the call (newly promoted, or
    already champion when the same run is registered again); `previous_champion` is the
    champion's value of `metric` before the call, None when there was none (or it had
    no value of `metric`: registered by hand, or under a metric its run lacks).
    """

    name: str
    version: int
    metric: str
    value: float
    run_id: str
    promoted: bool
    previous_champion: float | None
    reused: bool = False  # the run was already a version of the model: no new version made


def registered_name(experiment: str) -> str:
    """The registered model name of an experiment (one per dataset): `seg-<experiment>`.

    Args:
        experiment: the MLflow experiment name (`cfg.experiment`).
    """
    return f"seg-{experiment}"


def _client() -> MlflowClient:
    """A client on the project's tracking store. Unlike tracking.connect, this never creates an
    experiment: registering from an experiment that does not exist must fail, not make it."""
    return MlflowClient(tracking.use_store(create=False))


def _metric_of(run: Run, metric: str) -> tuple[str, float] | None:
    """(stored key, value) of `metric` on a run: `best_<metric>` when logged, because the
    per-epoch curve's last value is not the restored best epoch; else `metric` itself
    (e.g. `test_dice_coef`, logged once)."""
    for key in (f"best_{metric}", metric):
        if key in run.data.metrics:
            return key, run.data.metrics[key]
    return None


def best_run(experiment: str, metric: str) -> Run:
    """The FINISHED run with a logged model that is best on `metric` in `experiment`.

    Args:
        experiment: the MLflow experiment name.
        metric: a metric name such as `val_dice_coef` (ranked on `best_val_dice_coef` when runs
            log it) or `test_dice_coef`; direction from losses.monitor_mode (`*loss`: lower).
    """
    client = _client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SegMlopsError(f"experiment '{experiment}' not found in {tracking.tracking_uri()}: "
                            f"train it first (seg-mlops train)")
    direction = "ASC" if losses.monitor_mode(metric) == "min" else "DESC"
    for key in (f"best_{metric}", metric):
        # MLflow sorts runs missing the metric (or NaN) last, so the top run tells whether any has it.
        top = client.search_runs([found.experiment_id], filter_string=_REGISTRABLE, max_results=1,
                                 order_by=[f"metrics.`{key}` {direction}", "attributes.start_time DESC"])
        if not top:
            raise SegMlopsError(f"experiment '{experiment}' has no FINISHED run with a logged model: "
                                f"train first (seg-mlops train)")
        if key in top[0].data.metrics:
            return top[0]
    sample = client.search_runs([found.experiment_id], filter_string=_REGISTRABLE, max_results=20)
    names = sorted({name for run in sample for name in run.data.metrics})
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    raise SegMlopsError(f"no run of experiment '{experiment}' has metric '{metric}'; "
                        f"its runs have: {shown or 'no metrics'}")


def _version_tags(run: Run, metric: str, key: str, value: float) -> dict[str, str]:
    """What a version records about itself, so the registry UI answers "what is this model?"
    without opening the run."""
    params, tags = run.data.params, run.data.tags
    out = {"metric": metric, "metric_key": key, "metric_value": repr(value), "run_id": run.info.run_id}
    if "seg_mlops.dataset_fingerprint" in tags:
        out["dataset_fingerprint"] = tags["seg_mlops.dataset_fingerprint"]
    if "model.image_height" in params and "model.image_width" in params:
        out["input_size"] = f"{params['model.image_height']}x{params['model.image_width']}"
    if "model.num_classes" in params:
        out["classes"] = params["model.num_classes"]
    if "data.rgb_map" in params:
        out["rgb_map"] = params["data.rgb_map"]
    for tag, name in ((STUDY_TAG, "study"), (TRIAL_TAG, "trial")):
        if tag in tags:
            out[name] = tags[tag]
    return out


def _signature(model_uri: str) -> str | None:
    """The logged model's signature in one line ("inputs -> outputs"), None when it has none."""
    info = mlflow.models.get_model_info(model_uri)
    sig = info.signature
    return None if sig is None else f"{sig.inputs} -> {sig.outputs}"


def _champion_value(client: MlflowClient, name: str, metric: str):
    """(champion ModelVersion, its value of `metric`): (None, None) when there is no champion, and
    (champion, None) when it has no such value (registered by hand, or its run lacks the metric)."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None, None
        raise
    if champion.tags.get("metric") == metric and "metric_value" in champion.tags:
        return champion, float(champion.tags["metric_value"])
    # Registered under another metric: compare on the same metric, read from its run.
    found = _metric_of(client.get_run(champion.run_id), metric) if champion.run_id else None
    return champion, None if found is None else found[1]


def register_best(cfg: Config, metric: str | None = None, force: bool = False,
                  run_id: str | None = None) -> RegisterResult:
    """Register the experiment's best run (or `run_id`) as `seg-<experiment>`, alias it
    `candidate`, and promote it to `champion` when it beats the champion.

    Args:
        cfg: the experiment's config (`cfg.experiment`, `cfg.train.monitor`).
        metric: the metric that ranks runs and gates promotion; default `cfg.train.monitor`.
        force: make the version champion even when it is not better.
        run_id: register this run instead of the best one.
    """
    metric = metric or cfg.train.monitor
    name = registered_name(cfg.experiment)
    if run_id is None:
        run = best_run(cfg.experiment, metric)
        client = _client()
    else:
        client = _client()
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise SegMlopsError(f"run {run_id} not found in {tracking.tracking_uri()}") from None
    model_uri = run.data.tags.get(tracking.MODEL_URI_TAG)
    if model_uri is None:
        raise SegMlopsError(f"run {run.info.run_id} has no logged model (tag {tracking.MODEL_URI_TAG}); "
                            f"register a training run")
    found = _metric_of(run, metric)
    if found is None:
        raise SegMlopsError(f"run {run.info.run_id} has no metric '{metric}'; it has: "
                            f"{', '.join(sorted(run.data.metrics)) or 'no metrics'}")
    key, value = found
    tags = _version_tags(run, metric, key, value)

    # Read the champion before touching the model: the comparison is against the state before this call.
    champion, champion_value = _champion_value(client, name, metric)
    if champion is not None and champion_value is None and not force:
        raise SegMlopsError(f"champion version {champion.version} of {name} has no '{metric}' to compare "
                            f"with: pass another metric, or force (--force) to replace it")
    same = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    if same:
        version = same[0]
        for tag, tag_value in tags.items():  # the run may now be registered under another metric
            client.set_model_version_tag(name, version.version, tag, tag_value)
    else:
        version = mlflow.register_model(model_uri, name, tags=tags)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    client.update_model_version(name, version.version, description=run_page.model_card(
        client.get_run(run.info.run_id), name, version.version, _signature(model_uri)))

    if champion_value is None:
        better = True  # no champion yet (a champion without the value is only replaced with force)
    else:
        better = value < champion_value if losses.monitor_mode(metric) == "min" else value > champion_value
    already = champion is not None and str(champion.version) == str(version.version)
    promoted = already or force or better
    if promoted and not already:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return RegisterResult(name=name, version=int(version.version), metric=metric, value=value,
                          run_id=run.info.run_id, promoted=promoted, previous_champion=champion_value,
                          reused=bool(same))
