"""What the MLflow UI shows about a training run at a glance, beyond its curves.

- the experiment's kind tag (MLflow's model-training kind, not GenAI);
- the run's datasets: one `mlflow.log_input` per split (name, source folder, our fingerprint as
  digest, a profile with counts, sizes and class fractions), so the run page lists them and the
  test metrics can name the dataset they were measured on;
- the test set image by image: an MLflow table (`mlflow.log_table`) worst first, each row with its
  scores and an input | truth | prediction thumbnail, and the worst panels as image files;
- the run's one-line description and the registered version's model card (MLflow's description
  fields, shown on the run and model-version pages).

It only builds what MLflow stores; tracking and registry decide when to log it.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from mlflow.data.meta_dataset import MetaDataset

from seg_mlops import data
from seg_mlops.config import Config

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # the experiment kind MLflow's UI reads
TRAINING_KIND = "custom_model_development"  # "Machine learning" (model training), not GenAI
NOTE_TAG = "mlflow.note.content"  # a run's description in MLflow
CONTEXTS = {"train": "training", "valid": "validation", "test": "testing"}
REVIEW_TABLE = "per_image_review.json"  # the test set image by image, worst first
REVIEW_ROWS = 200  # rows (with their thumbnails) of that table at most; per_image.csv has them all
WORST_DIR = "worst_test_images"
WORST_COUNT = 5
PANEL_COLUMN = "input | truth | prediction"


# ----------------------------------------------------------------------------- the UI's layout

def training_view_links(store_uri: str, base_url: str, limit: int = 10) -> list[tuple[str, str]]:
    """[(experiment, URL)] of the store's latest experiments opened in MLflow's model-training
    layout. MLflow 3.17 picks the layout from a per-browser switch (GenAI | Model training, saved in
    the browser once clicked, GenAI by default) and reads the experiment-kind tag only without
    that switch; the `workflowType` URL parameter selects it for the page it opens."""
    from mlflow import MlflowClient

    experiments = MlflowClient(store_uri).search_experiments(max_results=limit, order_by=["last_update_time DESC"])
    links = [(e.name, f"{base_url}/#/experiments/{e.experiment_id}?workflowType=machine_learning")
             for e in experiments if e.name != "Default" or e.last_update_time != e.creation_time]
    return links or [("experiments", f"{base_url}/#/experiments?workflowType=machine_learning")]


# ----------------------------------------------------------------------------- datasets

class SplitDataset(MetaDataset):
    """One split as MLflow lists it under the run's Datasets: a name, the folder its images are
    read from, our fingerprint of its files as digest, and a profile (counts, sizes, classes)."""

    def __init__(self, source, name: str, digest: str, profile: dict):
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def class_names(num_classes: int) -> list[str]:
    """Names of the classes as the profile and the model card list them (background first)."""
    return ["background", "foreground"] if num_classes == 1 else [f"class{i}" for i in range(num_classes)]


def split_datasets(cfg: Config, profile: data.Profile) -> dict[str, SplitDataset]:
    """{split: dataset} for every split of the validation pass's profile (data.prepare)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    names = class_names(cfg.model.num_classes)
    out = {}
    for split, report in profile.splits.items():
        pairs = data.split_pairs(cfg, split)
        folder = pairs[0].image.parent
        summary = {
            "images": report["images"],
            "bytes": sum(p.image.stat().st_size + p.mask.stat().st_size for p in pairs),
            "model_input": f"{cfg.model.image_height}x{cfg.model.image_width}",
            "class_fractions": dict(zip(names, report["class_fractions"])),
            "mask_encoding": profile.encoding,
            "masks": str(pairs[0].mask.parent),
        }
        if cfg.data.valid_fraction and split in ("train", "valid"):
            summary["carved"] = f"data.valid_fraction={cfg.data.valid_fraction:g} of {folder}"
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": it is a local folder
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(folder))
        out[split] = SplitDataset(source, f"{cfg.experiment}-{split}", data.fingerprint(cfg, (split,)), summary)
    return out


def log_datasets(datasets: dict[str, SplitDataset]) -> None:
    import mlflow

    mlflow.log_inputs(datasets=list(datasets.values()), contexts=[CONTEXTS[s] for s in datasets],
                      tags_list=[{"seg_mlops.split": s} for s in datasets])


# ----------------------------------------------------------------------------- per-image review

def _score(value: str) -> float:
    return float(value) if value not in ("", None) else math.nan


def worst_first(rows: list[dict]) -> list[dict]:
    """Rows of per_image.csv, lowest dice first; images without a dice (empty truth) last."""
    return sorted(rows, key=lambda r: (math.isnan(_score(r["dice"])), _score(r["dice"]), r["image"]))


def review(model, cfg: Config, out_dir: str | Path) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    """The test set image by image from evaluate's per_image.csv: (table columns for
    mlflow.log_table, worst first, at most REVIEW_ROWS rows, each with its input | truth |
    prediction thumbnail; [(file name, panel)] of the WORST_COUNT worst images that have a dice)."""
    from PIL import Image

    from seg_mlops.callbacks import panel  # Keras: not for `seg-mlops ui`, which only needs the links
    from seg_mlops.infer import predict_probs, to_labels

    with open(Path(out_dir) / "per_image.csv", newline="") as f:
        rows = worst_first(list(csv.DictReader(f)))[:REVIEW_ROWS]
    by_name = {p.image.name: p for p in data.split_pairs(cfg, "test")}
    panels = []
    for start in range(0, len(rows), max(cfg.train.batch_size, 8)):
        chunk = rows[start:start + max(cfg.train.batch_size, 8)]
        pairs = [data.load_pair(by_name[r["image"]], cfg) for r in chunk]
        preds = to_labels(predict_probs(model, [image for image, _ in pairs]), cfg.infer.threshold)
        panels += [panel(image, truth, pred, cfg.palette()) for (image, truth), pred in zip(pairs, preds)]
    # The thumbnail second: the UI's table is wider than its panel, later columns need a scroll.
    table: dict[str, list] = {"image": [r["image"] for r in rows], PANEL_COLUMN: [Image.fromarray(p) for p in panels]}
    for column in [c for c in rows[0] if c != "image"] if rows else []:
        values = [_score(r[column]) for r in rows]
        table[column] = [None if math.isnan(v) else (int(v) if column.endswith("_pixels") else round(v, 4))
                         for v in values]
    worst = [(f"{rank:02d}_{Path(r['image']).stem}.png", p)
             for rank, (r, p) in enumerate(zip(rows, panels), 1) if not math.isnan(_score(r["dice"]))]
    return table, worst[:WORST_COUNT]


def log_review(table: dict, worst: Sequence[tuple[str, np.ndarray]]) -> None:
    import mlflow

    if table["image"]:
        mlflow.log_table(table, artifact_file=REVIEW_TABLE)
    for name, image in worst:
        mlflow.log_image(image, artifact_file=f"{WORST_DIR}/{name}")


# ----------------------------------------------------------------------------- descriptions

def run_description(cfg: Config, profile: data.Profile | None, history: dict[str, list[float]],
                    results: dict[str, float]) -> str:
    """One line: what was trained on what, for how long, and how well."""
    from seg_mlops import losses

    monitor = cfg.train.monitor
    values = history.get(monitor, [])
    best = losses.best_value(values, monitor)
    at = [i for i, v in enumerate(values) if v == best]
    kind = "binary" if cfg.model.num_classes == 1 else f"{cfg.model.num_classes}-class"
    counts = ""
    if profile is not None:
        counts = " / ".join(f"{profile.splits[s]['images']} {s}" for s in profile.splits) + " images, "
    line = (f"UNet ({kind}, {cfg.model.base_filters} base filters) trained on '{cfg.experiment}' "
            f"({counts}{cfg.model.image_height}x{cfg.model.image_width} px, dataset "
            f"{data.fingerprint(cfg)}) for {len(values)} epochs")
    if at:
        line += f"; best {monitor} {best:.4f} at epoch {at[0] + 1}"
    if "mean_image_dice" in results:
        line += f"; test mean image dice {results['mean_image_dice']:.4f}"
    return line + "."


