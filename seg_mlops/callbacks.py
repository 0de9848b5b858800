"""Plain Keras callbacks of ours: the reference's history CSVs/plots and epoch-inference panels.

They write files and keep their latest results in attributes; they know nothing of MLflow.
The tracking layer's logger gets the run's `EpochPanels` and reads their `panels` after each
epoch to log them as images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import keras
import numpy as np

from seg_mlops import data
from seg_mlops.config import Config, TiledInferConfig
from seg_mlops.infer import colorize, predict_probs, tiled_predict, to_labels, write_rgb


class HistoryWriter(keras.callbacks.Callback):
    """Writes train_losses.csv / train_metrics.csv every epoch and their PNG plots.

    Same files and columns as the reference (epoch 0-based, 4 decimals), minus its trailing
    comma. The CSVs are rewritten every epoch. The plots cost 0.1-0.25 s (both; 2-3 % of a 4 s
    epoch, bench/overhead.py), so they are drawn only when `plot_every` seconds have passed since
    fit began or they were last drawn, at the last epoch (all of train.epochs done, or fit told to
    stop: place this writer after the callbacks that stop it) and when fit ends: an interrupted run
    has plots at most that old, a finished one has them whole, and a short trial of a study draws
    them once (a pruned one never: bench/tuning.py).
    """

    def __init__(self, out_dir: str | Path, metrics: Sequence[str], plot_every: float = 10.0,
                 clock=time.monotonic):
        super().__init__()
        self.out_dir = Path(out_dir)
        self.metrics = list(metrics)
        self.rows: list[dict[str, float]] = []
        self.plot_every, self.clock = plot_every, clock
        self.plotted = 0  # rows the plots show
        self._plotted_at: float | None = None

    def on_train_begin(self, logs=None):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._plotted_at = self.clock()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        self.rows.append({"epoch": epoch, **{k: float(v) for k, v in logs.items()}})
        for name, columns in self._files():
            self._write(name, columns)
        last = epoch + 1 >= (self.params or {}).get("epochs", 0) or bool(getattr(self.model, "stop_training", False))
        if last or self._plotted_at is None or self.clock() - self._plotted_at >= self.plot_every:
            self.plot()

    def on_train_end(self, logs=None):
        if self.plotted < len(self.rows):
            self.plot()

    def plot(self) -> None:
        """Draw both PNG plots from the rows so far."""
        for name, columns in self._files():
            plot_history(self.rows, columns, self.out_dir / f"{name}.png")
        self.plotted, self._plotted_at = len(self.rows), self.clock()

    def _files(self) -> list[tuple[str, list[str]]]:
        return [("train_losses", ["loss", "val_loss"]),
                ("train_metrics", [n for m in self.metrics for n in (m, "val_" + m)])]

    def _write(self, name: str, columns: list[str]) -> None:
        lines = [",".join(["epoch"] + columns)]
        for row in self.rows:
            lines.append(",".join([str(row["epoch"])] + [f"{row.get(c, float('nan')):.4f}" for c in columns]))
        (self.out_dir / f"{name}.csv").write_text("\n".join(lines) + "\n")


def plot_history(rows: list[dict[str, float]], columns: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    epochs = [r["epoch"] for r in rows]
    for column in columns:
        ax.plot(epochs, [r.get(column, np.nan) for r in rows], "--" if column.startswith("val_") else "-",
                marker="o", label=column)
    ax.set_xlabel("epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def panel(image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray,
          palette: Sequence[Sequence[int]]) -> np.ndarray:
    """input | ground truth | prediction, side by side with a 2-px grey gap (RGB uint8)."""
    h, w = image.shape[:2]
    gap = np.full((h, 2, 3), 128, np.uint8)
    truth_rgb = colorize(truth, palette) if truth is not None else np.zeros_like(image)
    return np.concatenate([image, gap, truth_rgb, gap, colorize(pred, palette)], axis=1)


# The MLflow UI (3.17) shows a logged image in a square box as wide as its card (249 px), centred,
# under the run's name and a line (15.6 px) per run param: the picture is seen whole without
# scrolling while the params take at most 94.5 px - half its height. Runs log no config params,
# but `mlflow run` logs its entry point's (config, set: 2-3 lines): at 3:1 (83 px high) up to 3
# lines fit. Wider is smaller (the card enlarges on click).
MIN_ASPECT = 3.0


def composite(panels: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Several panels in one picture, for the MLflow UI's image card (one card per epoch series,
    not one per image): a grid of panels, `gap` px of grey between them, with the fewest columns
    that make it at least MIN_ASPECT times wider than tall (the widest grid when none does).
    Smaller panels are padded grey."""
    h = max(p.shape[0] for p in panels)
    w = max(p.shape[1] for p in panels)
    n = len(panels)

    def aspect(columns: int) -> float:
        rows = -(-n // columns)
        return (columns * (w + gap) - gap) / (rows * (h + gap) - gap)

    columns = next((c for c in range(1, n + 1) if aspect(c) >= MIN_ASPECT), n)
    rows = -(-n // columns)
    out = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 128, np.uint8)
    for i, p in enumerate(panels):
        y, x = (i // columns) * (h + gap), (i % columns) * (w + gap)
        out[y:y + p.shape[0], x:x + p.shape[1]] = p
    return out


class EpochInference(keras.callbacks.Callback):
    """After every epoch, predicts a few fixed images and writes input | truth | prediction panels.

    Inputs are loaded and resized once; the prediction is one batch. `panels` holds the latest
    {stem: RGB panel} and `epoch` the 1-based epoch they belong to, for other callbacks to log.
    """

    def __init__(self, images: np.ndarray, truths: Sequence[np.ndarray | None], stems: Sequence[str],
                 out_dir: str | Path, palette: Sequence[Sequence[int]], threshold: float = 0.5):
        super().__init__()
        self.images, self.truths, self.stems = images, list(truths), list(stems)
        self.out_dir = Path(out_dir)
        self.palette, self.threshold = palette, threshold
        self.panels: dict[str, np.ndarray] = {}
        self.epoch = 0

    @classmethod
    def from_config(cls, cfg: Config, out_dir: str | Path) -> "EpochInference | None":
        """The callback on the first train.epoch_infer_count pairs of train.epoch_infer_images/masks
        (see `fixed_files`), resized to the model's input; None when the count is 0."""
        t = cfg.train
        if t.epoch_infer_count == 0:
            return None
        size = (cfg.model.image_height, cfg.model.image_width)
        files = fixed_files(cfg, t.epoch_infer_images, t.epoch_infer_masks, t.epoch_infer_count)
        images, truths = [], []
        for path, mask in files:
            if mask is not None:
                image, labels = data.load_pair(data.Pair(path, mask), cfg)
            else:
                image, labels = data.resize_image(data.read_rgb(path), size, cfg.data.image_interpolation), None
            images.append(image)
            truths.append(labels)
        return cls(np.stack(images), truths, [p.stem for p, _ in files], Path(out_dir) / "epoch_infer",
                   cfg.palette(), cfg.infer.threshold)

    def on_train_begin(self, logs=None):
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def on_epoch_end(self, epoch, logs=None):
        preds = to_labels(predict_probs(self.model, list(self.images)), self.threshold)
        self.epoch = epoch + 1
        self.panels = {}
        for stem, image, truth, pred in zip(self.stems, self.images, self.truths, preds):
            self.panels[stem] = panel(image, truth, pred, self.palette)
            write_rgb(self.out_dir / f"epoch_{self.epoch:03d}_{stem}.png", self.panels[stem])


class EpochTiledInference(keras.callbacks.Callback):
    """After every epoch, tiled inference of a few fixed large images at full resolution (the
    reference's epoch_change_tiledinfer), written as input | truth | prediction panels.

    The panels are scaled down to at most `panel_height` px high (image by area, masks by nearest)
    so a 2048x1536 slide gives a 1365x512 panel, not a 20 MB one per epoch; the prediction itself
    is full size. `panels` and `epoch` as in EpochInference.
    """

    def __init__(self, images: Sequence[np.ndarray], truths: Sequence[np.ndarray | None], stems: Sequence[str],
                 out_dir: str | Path, palette: Sequence[Sequence[int]], tiled: TiledInferConfig, *, threshold: float = 0.5,
                 interpolation: str = "area", panel_height: int = 512):
        super().__init__()
        self.images, self.truths, self.stems = list(images), list(truths), list(stems)
        self.out_dir = Path(out_dir)
        self.palette, self.tiled, self.threshold = palette, tiled, threshold
        self.interpolation, self.panel_height = interpolation, panel_height
        self.panels: dict[str, np.ndarray] = {}
        self.epoch = 0

    @classmethod
    def from_config(cls, cfg: Config, out_dir: str | Path) -> "EpochTiledInference | None":
        """The callback on the first tiled_infer.epoch_infer_count pairs of
        tiled_infer.epoch_infer_images/masks (see `fixed_files`), at full size; None when the
        count is 0."""
        t = cfg.tiled_infer
        if t.epoch_infer_count == 0:
            return None
        files = fixed_files(cfg, t.epoch_infer_images, t.epoch_infer_masks, t.epoch_infer_count)
        images, truths = [], []
        for path, mask in files:
            images.append(data.read_rgb(path))
            truth = None
            if mask is not None:
                truth = data.read_mask(mask, cfg.model.num_classes)
                data.check_same_size(images[-1], truth, data.Pair(path, mask))
                truth = data.encode_mask(truth, cfg.data, cfg.model.num_classes, str(mask))
            truths.append(truth)
        return cls(images, truths, [p.stem for p, _ in files], Path(out_dir) / "epoch_tiled_infer", cfg.palette(),
                   t, threshold=cfg.infer.threshold, interpolation=cfg.data.image_interpolation)

    def on_train_begin(self, logs=None):
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch = epoch + 1
        self.panels = {}
        for stem, image, truth in zip(self.stems, self.images, self.truths):
            pred = tiled_predict(self.model, image, self.tiled, threshold=self.threshold,
                                 interpolation=self.interpolation)
            self.panels[stem] = panel(*self._display(image, truth, pred), self.palette)
            write_rgb(self.out_dir / f"epoch_{self.epoch:03d}_{stem}.png", self.panels[stem])

    def _display(self, image, truth, pred):
        h, w = image.shape[:2]
        if h <= self.panel_height:
            return image, truth, pred
        size = (max(1, round(w * self.panel_height / h)), self.panel_height)
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return (small, None if truth is None else cv2.resize(truth, size, interpolation=cv2.INTER_NEAREST),
                cv2.resize(pred, size, interpolation=cv2.INTER_NEAREST))


def fixed_files(cfg: Config, images: str, masks: str, count: int) -> list[tuple[Path, Path | None]]:
    """The first `count` images (sorted by name) of an epoch-inference folder and each one's mask
    (None without one: a black ground-truth panel).

    Args:
        cfg: the experiment config (its valid split is the default).
        images: the images folder; "" for the valid split's images.
        masks: the masks folder ("" for none); ignored when `images` is "" (the valid split's own).
        count: how many images.
    """
    if not images:  # the validation pairs: a carved share of train, or a fold, as the split is made
        return [(p.image, p.mask) for p in data.split_pairs(cfg, "valid")[:count]]
    files = data.list_images(images)[:count]
    by_stem = {p.stem: p for p in data.list_images(masks)} if masks else {}
    return [(path, by_stem.get(path.stem)) for path in files]


@dataclass(frozen=True)
class EpochPanels:
    """The run's epoch-inference callbacks (None when disabled): a logger placed after them reads
    their latest `panels` in its on_epoch_end."""

    inference: EpochInference | None
    tiled: EpochTiledInference | None

    @classmethod
    def from_config(cls, cfg: Config, out_dir: str | Path) -> "EpochPanels":
        return cls(EpochInference.from_config(cfg, out_dir), EpochTiledInference.from_config(cfg, out_dir))

    def callbacks(self) -> list[keras.callbacks.Callback]:
        return [c for c in (self.inference, self.tiled) if c is not None]
