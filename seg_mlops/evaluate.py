"""Test-split evaluation: overall, per-image and per-class scores, written as CSV.

Two kinds of numbers, both reported:
- the training loss and metrics on soft predictions, computed by Keras' own `model.evaluate`
  with the metrics the model trains with, so `test_<metric>` is computed exactly as `val_<metric>`
  (same code, same averaging; see seg_mlops.losses);
- hard-mask scores (threshold / argmax, as inference writes masks): per image, and per class
  over the whole split, which is what a user of the masks gets.

The empty rule (as in losses): a dice or IoU needs truth to score. An image whose truth holds no
foreground is skipped by the per-image means (and counted, with how many of them got false
positives); a class absent from the split's truth is not reported (a warning names it).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from seg_mlops import data, losses
from seg_mlops.config import Config
from seg_mlops.infer import to_labels


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num/den where den > 0, NaN (nothing to score) elsewhere."""
    return np.divide(num, den, out=np.full(np.shape(num), np.nan), where=np.asarray(den) > 0)


def class_names(cfg: Config) -> list[str]:
    return ["foreground"] if cfg.model.num_classes == 1 else [f"class{i}" for i in range(cfg.model.num_classes)]


def soft_scores(model, cfg: Config, dataset) -> dict[str, float]:
    """The loss and metrics of training, by Keras' evaluate on a compiled copy of `model` (the
    caller's model keeps its own compile state)."""
    import keras

    scorer = keras.Model.from_config(model.get_config())
    scorer.set_weights(model.get_weights())
    loss, metrics = losses.for_task(cfg.model.num_classes, cfg.train.loss, cfg.train.metrics)
    scorer.compile(loss=loss, metrics=metrics)
    return {k: float(v) for k, v in scorer.evaluate(dataset, return_dict=True, verbose=0).items()}


def hard_masks(truth: np.ndarray, pred: np.ndarray, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """One-hot boolean (n, H, W, channels) truth and prediction, as inference thresholds them."""
    if cfg.model.num_classes == 1:
        return (truth[..., 0] > 0.5)[..., None], (to_labels(pred, cfg.infer.threshold) == 1)[..., None]
    classes = np.arange(cfg.model.num_classes)
    return truth.argmax(-1)[..., None] == classes, to_labels(pred)[..., None] == classes


def evaluate(model, cfg: Config, out_dir: str | Path) -> dict[str, float]:
    """Score `model` on the test split; writes evaluation.csv and per_image.csv to `out_dir`.

    Returns {name: value}: the loss and metrics (soft, as Keras computes val_*), `mean_image_dice`
    and `mean_image_iou` (hard, foreground, over the images whose truth has foreground),
    `dice_<class>` / `iou_<class>` (hard, whole split, classes present in the truth),
    `empty_truth_images` and `false_positive_images` (of those, how many got any foreground).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, pairs = scoring_split(cfg)
    dataset = data.make_dataset(pairs, cfg, batch_size=cfg.train.batch_size, shuffle=False)
    results = soft_scores(model, cfg, dataset)
    rows, split_counts = hard_scores(model, cfg, pairs, dataset)
    return summarise(results, rows, split_counts, cfg, out_dir)


def scoring_split(cfg: Config) -> tuple[Config, list]:
    """The test split's pairs, validated, and the config to read them with (a binary mask
    encoding left "auto" is decided from the test split: evaluated on its own, e.g. seg-mlops
    evaluate or compare)."""
    if cfg.data.binary_mask == "auto":
        cfg, _ = data.prepare(cfg, ("test",))
    else:
        data.validate(data.split_pairs(cfg, "test"), cfg)
    return cfg, data.split_pairs(cfg, "test")


def per_image(model, cfg: Config, pairs: list) -> list[dict]:
    """The per-image rows of `model` on `pairs` (as per_image.csv holds them: `image`, `dice`
    NaN when the truth has no foreground, ...), without writing files or the soft pass.

    Args:
        model: the Keras network.
        cfg: as `scoring_split` returned it.
        pairs: the pairs `scoring_split` returned.
    """
    dataset = data.make_dataset(pairs, cfg, batch_size=cfg.train.batch_size, shuffle=False)
    return hard_scores(model, cfg, pairs, dataset)[0]


def hard_scores(model, cfg: Config, pairs: list, dataset) -> tuple[list[dict], np.ndarray]:
    """(per-image rows, (3, channels) intersection/truth/predicted pixel counts over the split) of
    the hard masks of `model` on `dataset` (the batches of `pairs`, in order)."""
    split_counts, rows = 0, []
    for x, y in dataset:
        hard_t, hard_p = hard_masks(y.numpy(), np.asarray(model.predict_on_batch(x), np.float32), cfg)
        # (3, n, channels): intersection, truth and predicted pixels of each image and channel
        counts = np.stack([(hard_t & hard_p).sum((1, 2)), hard_t.sum((1, 2)), hard_p.sum((1, 2))])
        split_counts = split_counts + counts.sum(1)  # (3, channels) over the split
        rows += [image_row(pairs[len(rows) + j].image.name, *counts[:, j], cfg) for j in range(counts.shape[1])]
    return rows, split_counts


def image_row(name: str, inter: np.ndarray, truth: np.ndarray, pred: np.ndarray, cfg: Config) -> dict:
    """One image's hard scores: dice and IoU averaged over the foreground classes its truth holds
    (NaN when it holds none), pixel counts, and for multiclass the dice of each class (NaN where
    the class is absent from the image's truth)."""
    fg = slice(0, 1) if cfg.model.num_classes == 1 else slice(1, None)
    dice = np.where(truth > 0, _ratio(2 * inter, truth + pred), np.nan)
    iou = np.where(truth > 0, _ratio(inter, truth + pred - inter), np.nan)
    scored = truth[fg] > 0
    row = {"image": name, "dice": float(dice[fg][scored].mean()) if scored.any() else np.nan,
           "iou": float(iou[fg][scored].mean()) if scored.any() else np.nan,
           "truth_pixels": int(truth[fg].sum()), "predicted_pixels": int(pred[fg].sum())}
    if cfg.model.num_classes > 1:
        row.update({f"dice_class{c}": float(dice[c]) for c in range(len(dice))})
    return row


def summarise(results: dict[str, float], rows: list[dict], split: np.ndarray, cfg: Config,
              out_dir: Path) -> dict[str, float]:
    """Add the hard means and per-class scores to `results`, write the CSVs, warn about what
    cannot be scored; NaN values are left out of the results (never logged as a number)."""
    scored = [r for r in rows if r["truth_pixels"]]
    results["mean_image_dice"] = float(np.mean([r["dice"] for r in scored])) if scored else np.nan
    results["mean_image_iou"] = float(np.mean([r["iou"] for r in scored])) if scored else np.nan
    results["empty_truth_images"] = float(len(rows) - len(scored))
    results["false_positive_images"] = float(sum(1 for r in rows if not r["truth_pixels"] and r["predicted_pixels"]))
    inter, truth, pred = split
    for name, dice, iou, present in zip(class_names(cfg), _ratio(2 * inter, truth + pred),
                                        _ratio(inter, truth + pred - inter), truth > 0):
        if not present:
            print(f"warning: {name} is absent from the test split's truth: dice_{name} and iou_{name} are not reported")
            continue
        results[f"dice_{name}"], results[f"iou_{name}"] = float(dice), float(iou)
    results = {k: v for k, v in results.items() if not np.isnan(v)}
    with open(out_dir / "evaluation.csv", "w", newline="") as f:
        f.write("name,score\n")
        f.writelines(f"{name},{value:.4f}\n" for name, value in results.items())
    with open(out_dir / "per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
    return results


def _cell(value) -> str:
    """A CSV cell: 4 decimals, empty for NaN (nothing to score)."""
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.4f}"
    return value
