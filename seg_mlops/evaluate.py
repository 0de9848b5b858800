"""Test-split evaluation: overall, per-image and per-class scores, written as CSV.

Two kinds of numbers, both reported:
- the training loss and metrics on soft predictions, averaged over batches as Keras does
  (`dice_coef` here is comparable with the reference's published evaluation.csv);
- hard-mask scores (threshold / argmax, as inference writes masks): per image, and per class
  over the whole split, which is what a user of the masks gets. An empty truth predicted empty
  counts as a perfect 1.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from seg_mlops import data, losses
from seg_mlops.config import Config
from seg_mlops.infer import to_labels


def _dice(inter: np.ndarray, total: np.ndarray) -> np.ndarray:
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


def _iou(inter: np.ndarray, total: np.ndarray) -> np.ndarray:
    union = total - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def class_names(cfg: Config) -> list[str]:
    return ["foreground"] if cfg.model.num_classes == 1 else [f"class{i}" for i in range(cfg.model.num_classes)]


def evaluate(model, cfg: Config, out_dir: str | Path) -> dict[str, float]:
    """Score `model` on the test split; writes evaluation.csv and per_image.csv to `out_dir`.

    Returns {name: value} with the loss and metrics (batch-averaged, soft), `mean_image_dice`,
    `mean_image_iou` and `dice_<class>` / `iou_<class>` (hard, over the whole split).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = data.split_pairs(cfg, "test")
    data.validate(pairs, cfg)
    loss_fn, metric_fns = losses.for_task(cfg.model.num_classes, cfg.train.loss, cfg.train.metrics)
    fns = {"loss": loss_fn, **{m.__name__: m for m in metric_fns}}
    soft = dict.fromkeys(fns, 0.0)
    binary = cfg.model.num_classes == 1
    channels = 1 if binary else cfg.model.num_classes
    inter_all = np.zeros(channels)
    total_all = np.zeros(channels)
    rows, seen = [], 0
    dataset = data.make_dataset(pairs, cfg, batch_size=cfg.train.batch_size, shuffle=False)
    for x, y in dataset:
        pred = np.asarray(model.predict_on_batch(x), dtype=np.float32)
        n = len(pred)
        for name, fn in fns.items():  # Keras-style: batch values averaged, weighted by batch size
            soft[name] += float(np.mean(fn(y, pred))) * n
        truth = y.numpy()
        if binary:
            hard_t, hard_p = truth[..., 0] > 0.5, to_labels(pred, cfg.infer.threshold) == 1
            hard_t, hard_p = hard_t[..., None], hard_p[..., None]
        else:
            classes = np.arange(channels)
            hard_t = truth.argmax(-1)[..., None] == classes
            hard_p = to_labels(pred)[..., None] == classes
        inter = (hard_t & hard_p).sum(axis=(1, 2))  # (n, channels)
        total = hard_t.sum(axis=(1, 2)) + hard_p.sum(axis=(1, 2))
        inter_all += inter.sum(0)
        total_all += total.sum(0)
        fg = slice(0, 1) if binary else slice(1, channels)  # per-image score: foreground classes
        for i in range(n):
            dice, iou = _dice(inter[i], total[i]), _iou(inter[i], total[i])
            row = {"image": pairs[seen + i].image.name,
                   "dice": dice[fg].mean(), "iou": iou[fg].mean()}
            if not binary:
                row.update({f"dice_class{c}": dice[c] for c in range(channels)})
            rows.append(row)
        seen += n

    results = {name: value / seen for name, value in soft.items()}
    results["mean_image_dice"] = float(np.mean([r["dice"] for r in rows]))
    results["mean_image_iou"] = float(np.mean([r["iou"] for r in rows]))
    for name, dice, iou in zip(class_names(cfg), _dice(inter_all, total_all), _iou(inter_all, total_all)):
        results[f"dice_{name}"] = float(dice)
        results[f"iou_{name}"] = float(iou)

    with open(out_dir / "evaluation.csv", "w", newline="") as f:
        f.write("name,score\n")
        f.writelines(f"{name},{value:.4f}\n" for name, value in results.items())
    with open(out_dir / "per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    return results
