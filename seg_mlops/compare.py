"""Compare two trained models on the same held-out test images, paired per image.

A model is named the way users name them: a run id, `runs:/<id>/model`, `models:/<name>/<version>`,
`models:/<name>@<alias>` or a local .keras file. Both are scored on the config's test split with
the per-image hard dice of seg_mlops.evaluate (one definition of the score), and the two score
columns go to seg_mlops.paired (bootstrap interval of the mean difference, Wilcoxon p).

Models trained on other data (dataset fingerprint) or with other classes are not compared
silently: `compare` refuses them in one line unless forced. The registry's promotion gate and
`seg-mlops compare` both use this module.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import io
import math
import re
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException

from seg_mlops import data, evaluate, paired, tracking
from seg_mlops.config import Config
from seg_mlops.errors import SegMlopsError

FINGERPRINT_TAG = "seg_mlops.dataset_fingerprint"  # on runs (tracking.run_tags)
VERSION_FINGERPRINT_TAG = "dataset_fingerprint"  # on registered versions (registry._version_tags)
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))$")


class NotComparable(SegMlopsError):
    """The two models (or a model and the config's data) do not share data or classes."""


@dataclass(frozen=True)
class Source:
    """A model to compare and where it came from.

    ref: what the user named; uri: what tracking.load_model loads (the raw Keras network when
    the run logged one); run_id, version: its run and registered version when known;
    fingerprint: the dataset it was trained on; classes: (num_classes, rgb_map) as its run
    params / version tags hold them. Unknown fields are None.
    """

    ref: str
    uri: str
    run_id: str | None = None
    version: str | None = None
    fingerprint: str | None = None
    classes: tuple | None = None

    @property
    def label(self) -> str:
        """The ref, with its run when the ref does not say it."""
        return self.ref if not self.run_id or self.run_id in self.ref else f"{self.ref} (run {self.run_id})"


def class_map(num_classes: str | None, rgb_map: str | None) -> tuple | None:
    """(num_classes, colours) from the strings of params/tags, comparable across both; None
    when the number of classes is unknown."""
    if num_classes is None:
        return None
    try:
        colours = tuple(tuple(c) for c in ast.literal_eval(rgb_map or "[]"))
    except (ValueError, SyntaxError, TypeError):
        colours = (rgb_map,)
    return int(num_classes), colours


def from_run(run, ref: str | None = None) -> Source:
    """The Source of a training run: its raw Keras network (tracking.MODEL_URI_TAG)."""
    tags, params = run.data.tags, tracking.run_values(run)
    uri = tags.get(tracking.MODEL_URI_TAG) or tags.get(tracking.PIPELINE_URI_TAG)
    if uri is None:
        raise SegMlopsError(f"run {run.info.run_id} has no logged model (tag {tracking.MODEL_URI_TAG}): "
                            "compare training runs, registered versions or .keras files")
    return Source(ref=ref or run.info.run_id, uri=uri, run_id=run.info.run_id, fingerprint=tags.get(FINGERPRINT_TAG),
                  classes=class_map(params.get("model.num_classes"), params.get("data.rgb_map")))


def resolve(ref: str) -> Source:
    """The Source of a run id, runs:/ URI, models:/ URI (version or alias) or local .keras file."""
    from pathlib import Path

    if Path(ref).is_file():
        return Source(ref=ref, uri=ref)
    if _RUN_ID.match(ref) or ref.startswith("runs:/"):
        run = _get_run(ref.removeprefix("runs:/").split("/")[0])
        source = from_run(run, ref)
        return source if not ref.startswith("runs:/") else dataclasses.replace(source, uri=ref)
    found = _MODELS_URI.match(ref)
    if found:
        return _from_version(ref, found["name"], found["version"], found["alias"])
    raise SegMlopsError(f"'{ref}' is no model: name a run id, runs:/<run_id>/model, models:/<name>/<version>, "
                        "models:/<name>@<alias> or a .keras file")


def _get_run(run_id: str):
    client = mlflow.MlflowClient(tracking.use_store(create=False))
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise SegMlopsError(f"run {run_id} not found in {tracking.tracking_uri()}") from None


def _from_version(ref: str, name: str, version: str | None, alias: str | None) -> Source:
    """A registered version: scored through its run's raw network when it has a run, else the
    registered model itself; data and classes from the version's tags, else its run's."""
    client = mlflow.MlflowClient(tracking.use_store(create=False))
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise SegMlopsError(f"{ref}: no such registered model version in {tracking.tracking_uri()} "
                            f"({str(exc).splitlines()[0]})") from None
    run = _get_run(found.run_id) if found.run_id else None
    if run is not None and tracking.MODEL_URI_TAG in run.data.tags:
        base = from_run(run, ref)
    else:  # registered by hand: the registered model itself (tracking.load_model finds its network)
        base = Source(ref=ref, uri=f"models:/{name}/{found.version}", run_id=found.run_id or None,
                      fingerprint=run.data.tags.get(FINGERPRINT_TAG) if run is not None else None)
    return dataclasses.replace(base, version=str(found.version),
                               classes=class_map(found.tags.get("classes"), found.tags.get("rgb_map")) or base.classes,
                               fingerprint=found.tags.get(VERSION_FINGERPRINT_TAG) or base.fingerprint)


def mismatches(cfg: Config, a: Source, b: Source) -> tuple[list[str], list[str]]:
    """(problems, notes): what makes the comparison unfair (other data or classes, or a test split
    that is not the held-out part of the data the models were trained on), and what could not be
    checked. The config's data must have the models' fingerprint: the fingerprint covers every
    split, so equal fingerprints mean the test images are the ones held out of their training."""
    problems = []
    if a.fingerprint and b.fingerprint and a.fingerprint != b.fingerprint:
        problems.append(f"A ({a.label}) was trained on dataset fingerprint {a.fingerprint}, "
                        f"B ({b.label}) on {b.fingerprint}")
    elif a.fingerprint or b.fingerprint:
        theirs, ours = a.fingerprint or b.fingerprint, data.fingerprint(cfg)
        if theirs != ours:
            problems.append(f"the config's data has fingerprint {ours} but the models were trained on "
                            f"{theirs}: its test split may not be held out from their training")
    ours_classes = (cfg.model.num_classes, tuple(tuple(c) for c in cfg.data.rgb_map))
    if a.classes and b.classes and a.classes != b.classes:
        problems.append(f"A has classes {_classes_text(a.classes)}, B has {_classes_text(b.classes)}")
    elif (a.classes or b.classes or ours_classes) != ours_classes:
        problems.append(f"the config has classes {_classes_text(ours_classes)} but the models "
                        f"{_classes_text(a.classes or b.classes)}: its masks would be read with other classes")
    notes = [f"{side}'s dataset fingerprint is unknown ({source.label}): not checked"
             for side, source in (("A", a), ("B", b)) if source.fingerprint is None]
    return problems, notes


def _classes_text(classes: tuple) -> str:
    count, colours = classes
    return f"{count}" + (f" {[list(c) for c in colours]}" if colours else "")


@dataclass(frozen=True)
class Comparison:
    """Two models scored on the same test images: `stats` compares B with A (difference B - A);
    `rows` holds one dict per image (image, dice_a, dice_b, difference; NaN where not scored)."""

    a: Source
    b: Source
    stats: paired.Paired
    rows: tuple[dict, ...]
    notes: tuple[str, ...] = ()

    def table(self) -> str:
        """The comparison as printed by `seg-mlops compare` and `register`."""
        s = self.stats
        ci = "n/a" if math.isnan(s.ci_low) else f"[{s.ci_low:+.4f}, {s.ci_high:+.4f}]"
        lines = [("A", self.a.label), ("B", self.b.label),
                 ("images paired", f"{s.n} ({s.skipped} skipped: no foreground in the truth)"
                  + (f"; {s.groups} groups (data.valid_group), resampled whole" if s.groups != s.n else "")),
                 ("mean dice A", f"{s.mean_a:.4f}"), ("mean dice B", f"{s.mean_b:.4f}"),
                 ("difference B - A", f"{s.difference:+.4f}"),
                 (f"{s.confidence:.1%} interval".replace(".0%", "%"),
                  f"{ci} (paired bootstrap, {s.resamples} resamples, seed {s.seed})"),
                 ("Wilcoxon p", f"{s.p_value:.4g}"), ("verdict", s.verdict)]
        lines += [("note", note) for note in self.notes]
        return "\n".join(f"{name:<18} {value}" for name, value in lines)

    def csv(self) -> str:
        """The per-image scores as CSV (empty cells: not scored)."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["image", "dice_a", "dice_b", "difference"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                         for row in self.rows)
        return out.getvalue()

    def metrics(self) -> dict[str, float]:
        """The numbers as MLflow metrics (NaN left out: never logged as a number)."""
        s = self.stats
        values = {"paired_images": s.n, "paired_groups": s.groups, "skipped_images": s.skipped, "mean_dice_a": s.mean_a,
                  "mean_dice_b": s.mean_b, "difference": s.difference, "ci_low": s.ci_low,
                  "ci_high": s.ci_high, "wilcoxon_p": s.p_value}
        return {k: float(v) for k, v in values.items() if not math.isnan(v)}


def score(model, cfg: Config, pairs: list) -> list[dict]:
    """Per-image rows (seg_mlops.evaluate.per_image) of `model` at its own input size."""
    classes = model.output_shape[-1]
    if classes != cfg.model.num_classes:
        raise NotComparable(f"the model outputs {classes} channel(s) but the config has model.num_classes="
                            f"{cfg.model.num_classes}: compare with the config the model was trained with")
    _, height, width, _ = model.input_shape
    sized = dataclasses.replace(cfg.model, image_height=height or cfg.model.image_height,
                                image_width=width or cfg.model.image_width)
    return evaluate.per_image(model, dataclasses.replace(cfg, model=sized), pairs)


def compare(cfg: Config, a: Source, b: Source, *, force: bool = False) -> Comparison:
    """Score A and B on the config's test split and compare them (B - A) at cfg.gate.confidence
    with cfg.gate.resamples resamples seeded by cfg.seed.

    Raises:
        NotComparable: other data or classes (see `mismatches`), unless `force`; with `force` the
            problems become notes of the comparison. Models whose outputs do not fit the config's
            classes cannot be scored, forced or not.
    """
    problems, notes = mismatches(cfg, a, b)
    if problems and not force:
        raise NotComparable(f"not compared: {'; '.join(problems)} (pass --force to compare anyway)")
    cfg, pairs = evaluate.scoring_split(cfg)
    models = {uri: tracking.load_model(uri) for uri in dict.fromkeys((a.uri, b.uri))}
    rows_a, rows_b = (score(models[source.uri], cfg, pairs) for source in (a, b))
    dice_a, dice_b = [r["dice"] for r in rows_a], [r["dice"] for r in rows_b]
    # copies of one object (data.valid_group) are one unit of evidence, not one per copy
    groups = [data.group_of(pair.image.stem, cfg.data.valid_group) for pair in pairs]
    stats = paired.compare(dice_a, dice_b, confidence=cfg.gate.confidence, resamples=cfg.gate.resamples,
                           seed=cfg.seed, groups=groups)
    rows = tuple({"image": r["image"], "dice_a": x, "dice_b": y, "difference": y - x}
                 for r, x, y in zip(rows_a, dice_a, dice_b))
    forced = [f"forced: {problem}" for problem in problems]
    return Comparison(a=a, b=b, stats=stats, rows=rows, notes=tuple(forced + notes))


def log_run(cfg: Config, comparison: Comparison, *, run_name: str = "compare") -> str:
    """A run in the config's experiment holding the comparison: params (what was compared, the
    gate settings), metrics, the verdict tag, and the per-image CSV and table as artifacts."""
    c, s = comparison, comparison.stats
    tags = {**tracking.run_tags(cfg), "seg_mlops.verdict": s.verdict}
    with tracking.start_run(cfg, run_name=run_name, tags=tags) as run:
        mlflow.log_params({"compare.a": c.a.ref, "compare.b": c.b.ref, "gate.confidence": s.confidence,
                           "gate.resamples": s.resamples, "seed": s.seed})
        mlflow.log_metrics(c.metrics())
        mlflow.log_text(c.csv(), "compare_per_image.csv")
        mlflow.log_text(c.table() + "\n", "compare.txt")
    return run.info.run_id
