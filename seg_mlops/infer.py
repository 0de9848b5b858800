"""Inference: predict masks for images of any size, and turn predictions into mask files.

The model's own input size decides the resize (not the config), so a model always gets what it
was trained on. Probabilities are resized back to the original size *before* thresholding or
argmax, which gives smooth mask edges instead of blocky upscaled labels. Masks are written as
lossless PNG (binary: 0/255; multiclass: a palette PNG whose pixel values are class indices and
whose palette is the rgb_map), never as soft JPEG maps (the reference's B9).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
from PIL import Image

from seg_mlops.data import list_images, read_rgb, resize_image
from seg_mlops.errors import SegMlopsError


def load_model(path: str | Path):
    """Load a saved .keras model (our losses and metrics are registered on import)."""
    import keras

    import seg_mlops.losses  # noqa: F401  (registers the custom objects the model refers to)

    path = Path(path)
    if not path.exists():
        raise SegMlopsError(f"model not found: {path} (pass the best_model.keras written by train)")
    import zipfile

    if path.suffix == ".keras" and not zipfile.is_zipfile(path):  # Keras would say "File not found"
        raise SegMlopsError(f"cannot load model {path}: not a .keras file (a .keras model is a zip "
                            "archive; it is damaged or something else); pass the best_model.keras written by train")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # keras raises many types; the user needs the file name and the reason
        raise SegMlopsError(f"cannot load model {path}: {str(exc).splitlines()[0]}") from None


def model_size(model) -> tuple[int, int]:
    """(height, width) the model takes."""
    return tuple(model.input_shape[1:3])


def predict_probs(model, images: Sequence[np.ndarray], interpolation: str = "area") -> np.ndarray:
    """Probabilities (N, h, w, C) at the model's size for RGB uint8 images of any size."""
    size = model_size(model)
    batch = np.stack([resize_image(img, size, interpolation) for img in images]).astype(np.float32)
    return np.asarray(model.predict_on_batch(batch), dtype=np.float32)


def to_labels(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Probabilities (..., C) -> uint8 labels (...): threshold for C == 1, argmax otherwise."""
    if probs.shape[-1] == 1:
        return (probs[..., 0] >= threshold).astype(np.uint8)
    return probs.argmax(axis=-1).astype(np.uint8)


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """uint8 labels (H, W) -> RGB (H, W, 3) with palette[i] for class i."""
    return np.asarray(palette, dtype=np.uint8)[labels]


def overlay(image: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]],
            alpha: float = 0.4) -> np.ndarray:
    """Blend class colours onto the image where labels > 0, in float (no uint8 wrap-around)."""
    colours = colorize(labels, palette).astype(np.float32)
    blend = image.astype(np.float32)
    fg = labels > 0
    blend[fg] = (1 - alpha) * blend[fg] + alpha * colours[fg]
    return np.clip(blend + 0.5, 0, 255).astype(np.uint8)


def write_mask(path: Path, labels: np.ndarray, palette: Sequence[Sequence[int]], binary: bool) -> None:
    """Binary: 8-bit 0/255 PNG. Multiclass: palette PNG (values = class ids, colours = rgb_map)."""
    if binary:
        Image.fromarray((labels * 255).astype(np.uint8), mode="L").save(path)
        return
    img = Image.fromarray(labels, mode="P")
    img.putpalette([c for colour in palette for c in colour])
    img.save(path)


def write_rgb(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise SegMlopsError(f"cannot write {path}")


def predict_files(model, files: Iterable[Path], *, batch_size: int = 8, threshold: float = 0.5,
                  interpolation: str = "area"):
    """Yield (path, RGB image, labels at the original size) for each file, predicting in batches."""
    files = list(files)
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images = [read_rgb(f) for f in chunk]
        probs = predict_probs(model, images, interpolation)
        for path, image, prob in zip(chunk, images, probs):
            full = cv2.resize(prob, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
            yield path, image, to_labels(full.reshape(*image.shape[:2], prob.shape[-1]), threshold)


def infer_folder(model, images_dir: str | Path, output_dir: str | Path, *,
                 palette: Sequence[Sequence[int]], threshold: float = 0.5, batch_size: int = 8,
                 colorize_masks: bool = False, overlays: bool = False, alpha: float = 0.4,
                 interpolation: str = "area") -> list[Path]:
    """Predict every image in `images_dir` and write `<output>/<stem>.png` masks at the original
    size, plus `<output>/colorized/` and `<output>/overlay/` when asked. Returns the mask paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if colorize_masks:
        (output_dir / "colorized").mkdir(exist_ok=True)
    if overlays:
        (output_dir / "overlay").mkdir(exist_ok=True)
    binary = model.output_shape[-1] == 1
    written = []
    for path, image, labels in predict_files(model, list_images(images_dir), batch_size=batch_size,
                                             threshold=threshold, interpolation=interpolation):
        mask_path = output_dir / f"{path.stem}.png"
        write_mask(mask_path, labels, palette, binary)
        if colorize_masks:
            write_rgb(output_dir / "colorized" / f"{path.stem}.png", colorize(labels, palette))
        if overlays:
            write_rgb(output_dir / "overlay" / f"{path.stem}.png", overlay(image, labels, palette, alpha))
        written.append(mask_path)
    return written
