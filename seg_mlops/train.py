"""Training: data + model + loss -> compiled Keras fit with plain Keras callbacks.

Knows nothing of MLflow or Optuna: they join through `extra_callbacks` (the tracking layer's
logging callback, the tuner's pruning callback). The monitored metric (`train.monitor`) is the one
name that checkpointing, early stopping and the LR reducer share.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import keras
import numpy as np

from seg_mlops import config as config_mod
from seg_mlops import data, losses
from seg_mlops.callbacks import EpochInference, HistoryWriter, PanelConsumer
from seg_mlops.config import Config
from seg_mlops.errors import SegMlopsError
from seg_mlops.model import build_unet

MODEL_FILE = "best_model.keras"


@dataclass
class TrainResult:
    output_dir: Path
    model_path: Path  # the best checkpoint on train.monitor
    history: dict[str, list[float]]
    model: keras.Model  # with the best weights restored
    epoch_inference: EpochInference | None


def compile_model(model: keras.Model, cfg: Config) -> list[str]:
    """Compile with Adam(learning_rate, clipvalue) and the task's loss/metrics; returns the
    metric names Keras will log (and checks that train.monitor is one of them)."""
    loss, metrics = losses.for_task(cfg.model.num_classes, cfg.train.loss, cfg.train.metrics)
    optimizer = keras.optimizers.Adam(learning_rate=cfg.train.learning_rate,
                                      clipvalue=cfg.train.clipvalue or None)
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
    names = [m.__name__ for m in metrics]
    logged = ["loss", "val_loss"] + names + ["val_" + n for n in names]
    if cfg.train.monitor not in logged:
        raise SegMlopsError(f"train.monitor={cfg.train.monitor!r} is not a logged metric; "
                            f"choose one of {', '.join(logged)}")
    return names


def epoch_inference(cfg: Config, out_dir: Path) -> EpochInference | None:
    """The epoch-inference callback on the first train.epoch_infer_count pairs (sorted by name)
    of epoch_infer_images/masks, or of the valid split by default. Images without a mask get a
    black ground-truth panel."""
    count = cfg.train.epoch_infer_count
    if count == 0:
        return None
    valid_images, valid_masks = cfg.split_dirs("valid")
    images_dir = Path(cfg.train.epoch_infer_images or valid_images)
    masks_dir = Path(cfg.train.epoch_infer_masks or (valid_masks if not cfg.train.epoch_infer_images else ""))
    files = data.list_images(images_dir)[:count]
    masks = {p.stem: p for p in data.list_images(masks_dir)} if str(masks_dir) not in ("", ".") else {}
    size = (cfg.model.image_height, cfg.model.image_width)
    images, truths = [], []
    for path in files:
        if path.stem in masks:
            image, labels = data.load_pair(data.Pair(path, masks[path.stem]), cfg)
        else:
            image, labels = data.resize_image(data.read_rgb(path), size, cfg.data.image_interpolation), None
        images.append(image)
        truths.append(labels)
    return EpochInference(np.stack(images), truths, [p.stem for p in files], out_dir / "epoch_infer",
                          cfg.palette(), cfg.infer.threshold)


def prepare_output(cfg: Config, overwrite: bool) -> Path:
    """The output folder, refusing to reuse one that holds a previous training unless asked:
    nothing is ever wiped (the reference rmtree'd its folders)."""
    out = cfg.output_dir
    if (out / MODEL_FILE).exists() and not overwrite:
        raise SegMlopsError(f"{out} already holds a trained model; pass --overwrite to replace its files "
                            f"or choose another folder with --set train.output_dir=...")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_mod.to_yaml(config_mod.public(cfg)))  # no storage password
    return out


def train(cfg: Config, *, extra_callbacks: Sequence[keras.callbacks.Callback] = (),
          overwrite: bool = False, verbose: int = 2) -> TrainResult:
    """Validate the data, build and compile the UNet, fit, and keep the best checkpoint.

    Args:
        cfg: the experiment config.
        extra_callbacks: appended after ours (so they see the epoch-inference panels).
        overwrite: reuse an output folder that already holds a model.
        verbose: Keras fit verbosity (2 = one line per epoch).
    """
    keras.utils.set_random_seed(cfg.seed)  # Python, NumPy and TF at once (the reference's B1)
    # Cheap checks first (model shape, loss and monitor names, every data file), so bad input
    # fails in seconds and before the output folder is touched.
    model = build_unet(**dataclasses.asdict(cfg.model))
    metric_names = compile_model(model, cfg)
    train_ds, valid_ds = data.make_datasets(cfg)
    out = prepare_output(cfg, overwrite)
    monitor, mode = cfg.train.monitor, losses.monitor_mode(cfg.train.monitor)

    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.ModelCheckpoint(out / MODEL_FILE, monitor=monitor, mode=mode, save_best_only=True),
        HistoryWriter(out, metric_names),
    ]
    if cfg.train.reducer_patience:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, mode=mode, factor=cfg.train.reducer_factor,
            patience=cfg.train.reducer_patience, verbose=1))
    if cfg.train.patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=monitor, mode=mode, patience=cfg.train.patience, restore_best_weights=True, verbose=1))
    inference = epoch_inference(cfg, out)
    if inference is not None:
        callbacks.append(inference)
    for callback in extra_callbacks:
        if isinstance(callback, PanelConsumer):
            callback.source = inference
    history = model.fit(train_ds, validation_data=valid_ds, epochs=cfg.train.epochs,
                        callbacks=callbacks + list(extra_callbacks), verbose=verbose,
                        shuffle=False)  # the dataset shuffles itself (seeded)
    if not cfg.train.patience and (out / MODEL_FILE).exists():
        model.load_weights(out / MODEL_FILE)  # no EarlyStopping to restore the best weights
    return TrainResult(out, out / MODEL_FILE, history.history, model, inference)
