"""Model registry: register an experiment's best trained run as `seg-<experiment>` and gate promotion.

The registered model is the run's segmentation pipeline (serving.py: encoded images of any size
in, masks out); runs that logged only the raw Keras network register that. Aliases: `candidate`
is the latest registered version; `champion` moves only when the candidate is significantly
better than it on the same test images (seg_mlops.compare: per-image dice, paired, bootstrap
interval above 0), or when forced. The monitored (validation) metric only picks which run is the
candidate. Serving and inference load `models:/seg-<experiment>@champion`, so they follow
promotions without a code change.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from seg_mlops import compare, losses, tracking
from seg_mlops.config import Config
from seg_mlops.errors import SegMlopsError

CHAMPION = "champion"
CANDIDATE = "candidate"
# Run tags that tuning sets on trial runs; copied to the version so it says which trial it is.
STUDY_TAG = "seg_mlops.study"
TRIAL_TAG = "seg_mlops.trial"
# The version tags the gate writes (gate_decision and gate_reason always, the numbers when compared).
GATE_NUMBERS = ("gate_mean_dice_champion", "gate_mean_dice_candidate", "gate_difference", "gate_ci_low",
                "gate_ci_high", "gate_confidence", "gate_n", "gate_skipped", "gate_p_value", "compared_with",
                "gate_groups")
# Only training runs that finished and logged a model can be registered.
_REGISTRABLE = f"attributes.status = 'FINISHED' and tags.`{tracking.MODEL_URI_TAG}` IS NOT NULL"


@dataclass(frozen=True)
class RegisterResult:
    """What `register_best` did.

    `promoted` is True when the version is the champion after the call (newly promoted, or
    already champion when the same run is registered again); `previous_champion` is the
    champion's value of `metric` before the call, None when there was none (or it had
    no value of `metric`: registered by hand, or under a metric its run lacks): for information,
    the gate decides on the test comparison. `decision` is first | promoted | candidate | forced |
    already-champion, `reason` the sentence saying why, `comparison` the paired test comparison
    (A = the champion, B = this version) when one was made.
    """

    name: str
    version: int
    metric: str
    value: float
    run_id: str
    promoted: bool
    previous_champion: float | None
    reused: bool = False  # the run was already a version of the model: no new version made
    decision: str = ""
    reason: str = ""
    comparison: compare.Comparison | None = None


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
    params, tags = tracking.run_values(run), run.data.tags
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
    # Registered under another metric: its value of this metric, read from its run.
    found = _metric_of(client.get_run(champion.run_id), metric) if champion.run_id else None
    return champion, None if found is None else found[1]


def register_best(cfg: Config, metric: str | None = None, force: bool = False,
                  run_id: str | None = None) -> RegisterResult:
    """Register the experiment's best run (or `run_id`) as `seg-<experiment>`, alias it
    `candidate`, and promote it to `champion` when it is significantly better than the champion
    on the config's test split (see `gate`).

    Args:
        cfg: the experiment's config (`cfg.experiment`, `cfg.train.monitor`, the test split,
            `cfg.gate`).
        metric: the metric that picks the best run; default `cfg.train.monitor`.
        force: make the version champion even when it is not better, or not comparable.
        run_id: register this run instead of the best one.

    Raises:
        compare.NotComparable: the champion was trained on other data or classes (unless force);
            nothing is registered then.
    """
    metric = metric or cfg.train.monitor
    name = registered_name(cfg.experiment)
    client = _client()
    run = best_run(cfg.experiment, metric) if run_id is None else _get_run(client, run_id)
    # the pipeline (images in, masks out) when the run logged one; runs from before it: the network
    model_uri = run.data.tags.get(tracking.PIPELINE_URI_TAG) or run.data.tags.get(tracking.MODEL_URI_TAG)
    if model_uri is None:
        raise SegMlopsError(f"run {run.info.run_id} has no logged model (tag {tracking.MODEL_URI_TAG}); "
                            f"register a training run")
    found = _metric_of(run, metric)
    if found is None:
        raise SegMlopsError(f"run {run.info.run_id} has no metric '{metric}'; it has: "
                            f"{', '.join(sorted(run.data.metrics)) or 'no metrics'}")
    key, value = found

    # Decide before touching the model: the comparison is against the champion before this call,
    # and a refused comparison registers nothing.
    champion, champion_value = _champion_value(client, name, metric)
    same = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    already = champion is not None and bool(same) and str(champion.version) == str(same[0].version)
    decision, reason, comparison = gate(cfg, run, champion, already=already, force=force)
    tags = {**_version_tags(run, metric, key, value), **_gate_tags(decision, reason, comparison, champion)}
    version = _set_version(client, name, model_uri, tags, same[0] if same else None)
    recorded = client.get_model_version(name, version.version).tags  # a reused version keeps its gate tags
    client.update_model_version(name, version.version, description=model_card(
        run, name, int(version.version), metric, key, value, gate=recorded))
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    promoted = decision in ("first", "promoted", "forced", "already-champion")
    if promoted and not already:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return RegisterResult(name=name, version=int(version.version), metric=metric, value=value,
                          run_id=run.info.run_id, promoted=promoted, previous_champion=champion_value,
                          reused=bool(same), decision=decision, reason=reason, comparison=comparison)


def _get_run(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise SegMlopsError(f"run {run_id} not found in {tracking.tracking_uri()}") from None


def gate(cfg: Config, run: Run, champion, *, already: bool = False,
         force: bool = False) -> tuple[str, str, compare.Comparison | None]:
    """(decision, reason, comparison) of promoting `run` over `champion` (a ModelVersion or None).

    The champion (A) and the run (B) are scored on the config's test split, paired per image;
    the run is promoted only when the bootstrap interval of the mean per-image dice difference
    lies above 0 at cfg.gate.confidence. Decisions: `first` (no champion), `already-champion`,
    `promoted`, `candidate` (not significantly better: stays candidate), `forced`.
    """
    if champion is None:
        return "first", "first version: no champion to compare with", None
    if already:
        return "already-champion", f"already champion (version {champion.version})", None
    against = f"champion version {champion.version}"
    try:
        result = compare.compare(cfg, compare.resolve(f"models:/{champion.name}/{champion.version}"),
                                 compare.from_run(run), force=force)
    except SegMlopsError as exc:
        if not force:
            raise
        return "forced", f"forced (--force) without a comparison with {against}: {exc}", None
    s = result.stats
    groups = f" in {s.groups} groups" if s.groups != s.n else ""
    interval = "no interval" if s.groups < 2 else f"{s.confidence:.1%} interval [{s.ci_low:+.4f}, {s.ci_high:+.4f}]"
    numbers = (f"mean per-image test dice {s.mean_b:.4f} vs {s.mean_a:.4f}, difference {s.difference:+.4f}, "
               f"{interval.replace('.0%', '%')}, n={s.n} images{groups} ({s.skipped} skipped), Wilcoxon p={s.p_value:.3g}")
    if s.b_better:
        return "promoted", f"significantly better than {against}: {numbers}", result
    if force:
        return "forced", f"forced (--force) although not significantly better than {against}: {numbers}", result
    return "candidate", (f"stays candidate: not significantly better than {against} (the interval must lie "
                         f"above 0): {numbers}"), result


def _gate_tags(decision: str, reason: str, comparison: compare.Comparison | None, champion) -> dict[str, str]:
    """The version tags of a gate decision (none for `already-champion`: its tags stay those of
    the decision that made it champion)."""
    if decision == "already-champion":
        return {}
    tags = {"gate_decision": decision, "gate_reason": reason}
    if comparison is not None:
        s = comparison.stats
        numbers = (s.mean_a, s.mean_b, s.difference, s.ci_low, s.ci_high, s.confidence, s.n, s.skipped, s.p_value,
                   champion.version, s.groups)
        tags.update({name: repr(v) if isinstance(v, float) else str(v) for name, v in zip(GATE_NUMBERS, numbers)})
    return tags


def _set_version(client: MlflowClient, name: str, model_uri: str, tags: dict[str, str], existing):
    """A new version of `model_uri` with `tags`, or `existing` (the run's version) re-tagged: the
    run may now be registered under another metric, and an old comparison's numbers go."""
    if existing is None:
        return mlflow.register_model(model_uri, name, tags=tags)
    for tag, value in tags.items():
        client.set_model_version_tag(name, existing.version, tag, value)
    if "gate_decision" in tags:
        for tag in set(GATE_NUMBERS) & set(existing.tags) - set(tags):
            client.delete_model_version_tag(name, existing.version, tag)
    return existing


def model_card(run: Run, name: str, version: int, metric: str, key: str, value: float,
               gate: dict[str, str] | None = None) -> str:
    """The version's description (Markdown): data, classes and colours, input contract, metrics,
    the promotion decision (from the version's `gate` tags) and a copy-paste call, read from the
    run's config values (tracking.run_values), tags and metrics."""
    params, tags = tracking.run_values(run), run.data.tags
    pipeline = tracking.PIPELINE_URI_TAG in tags
    classes = int(params.get("model.num_classes", "1"))
    colours = ("0 background (0, 0, 0), 1 foreground (mask value 255)" if classes == 1 else
               ", ".join(f"{i} {tuple(c)}" for i, c in enumerate(_literal(params.get("data.rgb_map", "[]")))))
    size = f"{params.get('model.image_height', '?')}x{params.get('model.image_width', '?')}"
    lines = [f"# {name} version {version}", "",
             f"UNet segmentation (seg_mlops), run `{run.info.run_id}` of experiment "
             f"`{tags.get('seg_mlops.experiment', '?')}`.", "",
             "## Data", "",
             f"- dataset fingerprint: `{tags.get('seg_mlops.dataset_fingerprint', 'unknown')}`",
             f"- mask encoding: {tags.get(tracking.MASK_ENCODING_TAG, 'unknown')}",
             f"- classes ({max(2, classes)}): {colours}", "",
             "## Input contract", ""]
    if pipeline:
        lines += [f"- `image` column: PNG/JPEG/TIFF bytes of any size (base64 strings over REST), or HxWx3 "
                  f"uint8 RGB arrays in Python; the network sees {size} px (resized, or tiled)",
                  f"- params: mode resize|tiled, threshold (default {params.get('infer.threshold', '0.5')}), "
                  f"tile_size ({params.get('tiled_infer.tile_size', '0')}), overlap "
                  f"({params.get('tiled_infer.overlap', '64')}), blend "
                  f"({params.get('tiled_infer.mode', 'average')}), tta, output mask|probabilities|colorized, "
                  "on_error raise|report",
                  "- output: `mask` (PNG at the image's size: binary 0/255, multiclass a palette PNG whose "
                  "values are class ids), `height`, `width`, `pixels` per class, `error`"]
    else:
        lines += [f"- raw network: float32 (N, {size.replace('x', ', ')}, 3) pixels 0..255 in, "
                  "probabilities out (no pipeline logged by this run)"]
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|", f"| {key} (ranks versions) | {value:.4f} |"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(run.data.metrics.items()) if k.startswith("test_")]
    lines += promotion_lines(gate or {})
    uri = f"models:/{name}/{version}"
    lines += ["", "## Call", "", f"    mlflow models serve -m {uri} --env-manager local -p 5001"]
    if pipeline:
        lines += ["    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\",
                  "         -d '{\"dataframe_records\": [{\"image\": \"'$(base64 -w0 image.png)'\"}], "
                  "\"params\": {\"mode\": \"resize\"}}'",
                  f"    seg-mlops batch-infer --model {uri} --images 'slides/**/*.jpg' --output masks/"]
    return "\n".join(lines) + "\n"


def promotion_lines(tags: dict[str, str]) -> list[str]:
    """The model card's Promotion section from a version's gate tags ([] when it has none)."""
    if "gate_decision" not in tags:
        return []
    lines = ["", "## Promotion", "", f"**{tags['gate_decision']}**: {tags['gate_reason']}"]
    if "gate_difference" not in tags:
        return lines
    number = {k: float(tags[k]) for k in GATE_NUMBERS if k in tags and k != "compared_with"}
    confidence = f"{number['gate_confidence']:.1%}".replace(".0%", "%")
    return lines + [
        "", f"| test split, paired per image | champion version {tags['compared_with']} | this version |",
        "|---|---|---|",
        f"| mean per-image dice | {number['gate_mean_dice_champion']:.4f} | {number['gate_mean_dice_candidate']:.4f} |",
        f"| difference (this - champion) | | {number['gate_difference']:+.4f} |",
        f"| {confidence} bootstrap interval | | [{number['gate_ci_low']:+.4f}, {number['gate_ci_high']:+.4f}] |",
        f"| images paired (skipped: no foreground) | | {tags['gate_n']} ({tags['gate_skipped']}) |",
        f"| independent groups resampled (data.valid_group) | | {tags.get('gate_groups', tags['gate_n'])} |",
        f"| Wilcoxon signed-rank p | | {number['gate_p_value']:.3g} |"]


def _literal(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
