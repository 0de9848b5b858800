"""Inference: predict masks for images of any size, and turn predictions into mask files.

Whole-image inference resizes each image to the model's size. Tiled inference (for images much
larger than the model, e.g. 2048x1536 slides) cuts the image into overlapping tiles
(seg_mlops.tiling), predicts them in batches and stitches the probabilities back at full
resolution: "average" blends overlaps with a Hann window, "context" pastes each tile's core,
"bitwise_blending" intersects context-stitched labels with the whole-image prediction.

The model's own input size decides the resize (not the config), so a model always gets what it
was trained on. Probabilities are resized back to the original size *before* thresholding or
argmax, which gives smooth mask edges instead of blocky upscaled labels. Masks are written as
lossless PNG (binary: 0/255; multiclass: a palette PNG whose pixel values are class indices and
whose palette is the rgb_map), never as soft JPEG maps (the reference's B9).
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from seg_mlops import data, tiling
from seg_mlops.config import Config, TiledInferConfig
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


def forward(model, batch: np.ndarray, tta: bool = False) -> np.ndarray:
    """Probabilities (N, h, w, C) float32 of a float32 batch at the model's size. With `tta`, the
    mean of the predictions of the batch as it is, flipped left-right and flipped up-down (each
    flipped back before averaging)."""
    probs = np.asarray(model.predict_on_batch(batch), dtype=np.float32)
    if not tta:
        return probs
    total = probs.copy()
    for axis in (2, 1):  # width, height
        flipped = np.ascontiguousarray(np.flip(batch, axis))
        total += np.flip(np.asarray(model.predict_on_batch(flipped), dtype=np.float32), axis)
    return total / 3


def predict_probs(model, images: Sequence[np.ndarray], interpolation: str = "area", tta: bool = False) -> np.ndarray:
    """Probabilities (N, h, w, C) at the model's size for RGB uint8 images of any size."""
    size = model_size(model)
    batch = np.stack([resize_image(img, size, interpolation) for img in images]).astype(np.float32)
    return forward(model, batch, tta)


def upsize(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    """Probabilities (h, w, C) resized (bilinear) to (height, width, C)."""
    if prob.shape[:2] == (height, width):
        return prob
    return cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR).reshape(height, width, prob.shape[-1])


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


def encode_mask(labels: np.ndarray, palette: Sequence[Sequence[int]], binary: bool) -> bytes:
    """The PNG file of a mask. Binary: 8-bit 0/255. Multiclass: palette PNG (values = class ids,
    colours = rgb_map)."""
    if binary:
        return data.encode_file((labels * 255).astype(np.uint8))
    return data.encode_palette(labels, palette)


encode_rgb = data.encode_rgb  # colour masks and overlays


def encode_probs(probs: np.ndarray) -> bytes:
    """Probabilities (H, W, C) float32 as a .npy file (np.load(io.BytesIO(data)) reads it)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(probs, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def class_pixels(labels: np.ndarray, classes: int) -> list[int]:
    """Pixels of each class id 0..classes-1 in a label mask (binary: classes=2)."""
    return np.bincount(labels.ravel(), minlength=classes)[:classes].tolist()


def write_mask(path: Path, labels: np.ndarray, palette: Sequence[Sequence[int]], binary: bool) -> None:
    """Write encode_mask's PNG to `path`."""
    data.write_bytes(path, encode_mask(labels, palette, binary))


write_rgb = data.write_rgb  # panels, colour masks and overlays



# ----------------------------------------------------------------------------- the pipeline

@dataclass(frozen=True)
class Settings:
    """How images become masks: the inference params of `seg-mlops infer` / `tiled-infer` and of
    the logged pipeline model (seg_mlops.serving), which both call `segment`.

    mode: "resize" (each image resized to the model, probabilities resized back) or "tiled"
    (overlapping tiles at full resolution, stitched by tiled.mode); threshold: binary foreground
    threshold; tta: average the predictions of the image and its left-right and up-down flips;
    batch_size: whole images per forward pass (tiled: tiled.batch_size tiles); interpolation:
    how images (and tiles) are resized to the model's size.
    """

    mode: str = "resize"
    threshold: float = 0.5
    tiled: TiledInferConfig = field(default_factory=TiledInferConfig)
    tta: bool = False
    batch_size: int = 8
    interpolation: str = "area"

    @classmethod
    def from_config(cls, cfg: Config, mode: str = "resize", tta: bool = False) -> "Settings":
        return cls(mode=mode, threshold=cfg.infer.threshold, tiled=cfg.tiled_infer, tta=tta,
                   batch_size=cfg.infer.batch_size, interpolation=cfg.data.image_interpolation)


def segment(model, images: Sequence[np.ndarray], settings: Settings) -> list[np.ndarray]:
    """uint8 labels (H, W) of each RGB uint8 image, at its own size."""
    if settings.mode == "tiled":
        return [tiled_predict(model, image, settings.tiled, threshold=settings.threshold,
                              interpolation=settings.interpolation, tta=settings.tta) for image in images]
    return [to_labels(prob, settings.threshold) for prob in probabilities(model, images, settings)]


def probabilities(model, images: Sequence[np.ndarray], settings: Settings) -> list[np.ndarray]:
    """Probabilities (H, W, C) float32 of each RGB uint8 image, at its own size (tiled with
    "bitwise_blending": the context-stitched probabilities, before the intersection)."""
    if settings.mode == "tiled":
        t = settings.tiled
        stitch = "context" if t.mode == "bitwise_blending" else t.mode
        return [tiled_probs(model, image, tile_size=t.tile_size, overlap=t.overlap, mode=stitch,
                            batch_size=t.batch_size, interpolation=settings.interpolation, tta=settings.tta)
                for image in images]
    if settings.mode != "resize":
        raise SegMlopsError(f"mode={settings.mode!r}: expected resize or tiled")
    out = []
    for start in range(0, len(images), settings.batch_size):
        chunk = images[start:start + settings.batch_size]
        probs = predict_probs(model, chunk, settings.interpolation, settings.tta)
        out.extend(upsize(prob, *image.shape[:2]) for image, prob in zip(chunk, probs))
    return out


def predict_files(model, files: Iterable[Path], settings: Settings):
    """Yield (path, RGB image, labels at the original size) for each file, `settings.batch_size`
    files decoded and predicted at a time."""
    files = list(files)
    for start in range(0, len(files), settings.batch_size):
        chunk = files[start:start + settings.batch_size]
        images = [read_rgb(f) for f in chunk]
        yield from zip(chunk, images, segment(model, images, settings))


def infer_folder(model, images_dir: str | Path, output_dir: str | Path, *,
                 palette: Sequence[Sequence[int]], threshold: float = 0.5, batch_size: int = 8,
                 colorize_masks: bool = False, overlays: bool = False, alpha: float = 0.4,
                 interpolation: str = "area", settings: Settings | None = None) -> list[Path]:
    """Predict every image in `images_dir` and write `<output>/<stem>.png` masks at the original
    size, plus `<output>/colorized/` and `<output>/overlay/` when asked. Returns the mask paths.
    `settings` (tiled mode, tta...) replaces threshold, batch_size and interpolation when given."""
    if settings is None:
        settings = Settings(threshold=threshold, batch_size=batch_size, interpolation=interpolation)
    output_dir = _prepare_output(output_dir, colorize_masks, overlays)
    binary = model.output_shape[-1] == 1
    written = []
    for path, image, labels in predict_files(model, list_images(images_dir), settings):
        written.append(write_outputs(output_dir, path.stem, image, labels, palette, binary,
                                     colorize_masks, overlays, alpha))
    return written


def write_outputs(output_dir: Path, stem: str, image: np.ndarray, labels: np.ndarray,
                  palette: Sequence[Sequence[int]], binary: bool, colorize_masks: bool, overlays: bool,
                  alpha: float) -> Path:
    """Write `<output>/<stem>.png` (and the colorized/overlay copies when asked); returns the mask
    path. The colorized/ and overlay/ folders must exist when asked for."""
    mask_path = output_dir / f"{stem}.png"
    write_mask(mask_path, labels, palette, binary)
    if colorize_masks:
        write_rgb(output_dir / "colorized" / f"{stem}.png", colorize(labels, palette))
    if overlays:
        write_rgb(output_dir / "overlay" / f"{stem}.png", overlay(image, labels, palette, alpha))
    return mask_path


def _prepare_output(output_dir: str | Path, colorize_masks: bool, overlays: bool) -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if colorize_masks:
        (output_dir / "colorized").mkdir(exist_ok=True)
    if overlays:
        (output_dir / "overlay").mkdir(exist_ok=True)
    return output_dir


# ----------------------------------------------------------------------------- tiled inference

def tile_shape(model, tile_size: int = 0) -> tuple[int, int]:
    """(h, w) of a tile in image px: the model's input size for tile_size 0, else tile_size for
    the height and the width that keeps the model's aspect ratio (tile_size x tile_size for the
    usual square models); tiles are resized to the model's size before prediction."""
    mh, mw = model_size(model)
    if tile_size == 0:
        return mh, mw
    return tile_size, max(1, round(tile_size * mw / mh))


def tiled_probs(model, image: np.ndarray, *, tile_size: int = 0, overlap: int = 64, mode: str = "average",
                batch_size: int = 8, interpolation: str = "area", tta: bool = False) -> np.ndarray:
    """Probabilities (H, W, C) float32 for an RGB uint8 image of any size, from overlapping tiles.

    Args:
        model: a Keras model taking (N, h, w, 3) raw pixels.
        image: RGB uint8 (H, W, 3).
        tile_size: px of the image per tile (0 = the model's input size: no resizing).
        overlap: px each tile reaches into its neighbours' cores (neighbours share 2 * overlap px).
        mode: "average" (overlaps blended with a Hann window, normalised by the summed weights) or
            "context" (each pixel taken from the one tile whose core holds it).
        batch_size: tiles per `model.predict_on_batch` call.
        interpolation: how tiles are resized to the model's size (probabilities come back bilinear).
        tta: average each tile's prediction with those of its flips (see `forward`).
    """
    if mode not in ("average", "context"):
        raise ValueError(f"mode={mode!r}: expected average or context")
    th, tw = tile_shape(model, tile_size)
    mh, mw = model_size(model)
    height, width = image.shape[:2]
    grid = tiling.overlap_grid(height, width, (th, tw), overlap)
    source = tiling.pad_to(image, *grid.padded)  # only images smaller than a tile grow
    # One float32 canvas for the whole image (plus one weight plane for "average"), never one per
    # tile: 2048x1536x1 is 12 MB.
    canvas = np.zeros((*grid.padded, model.output_shape[-1]), np.float32)
    if mode == "average":
        win = tiling.window(th, tw)
        weights = np.zeros(grid.padded, np.float32)
    tiles = list(grid)
    batch = np.empty((min(batch_size, len(tiles)), mh, mw, 3), np.float32)
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start:start + batch_size]
        for i, t in enumerate(chunk):
            batch[i] = resize_image(source[t.y:t.y + th, t.x:t.x + tw], (mh, mw), interpolation)
        probs = forward(model, batch[:len(chunk)], tta)
        for t, prob in zip(chunk, probs):
            prob = upsize(prob, th, tw)
            if mode == "average":
                canvas[t.y:t.y + th, t.x:t.x + tw] += prob * win[..., None]
                weights[t.y:t.y + th, t.x:t.x + tw] += win
            else:
                canvas[t.cy0:t.cy1, t.cx0:t.cx1] = prob[t.cy0 - t.y:t.cy1 - t.y, t.cx0 - t.x:t.cx1 - t.x]
    if mode == "average":
        canvas /= weights[..., None]
    return canvas[:height, :width]


def tiled_predict(model, image: np.ndarray, tiled: TiledInferConfig, *, threshold: float = 0.5,
                  interpolation: str = "area", tta: bool = False) -> np.ndarray:
    """uint8 labels (H, W) of an RGB image of any size by tiled inference.

    Probabilities are blended in float and thresholded (binary) or argmax'ed (multiclass) once,
    at the end. "bitwise_blending" keeps a pixel's context-stitched label only where the
    whole-image prediction (image resized to the model, probabilities resized back) gives the
    same label, else background: for binary masks, the intersection of the two masks.

    Args:
        model: a Keras model taking (N, h, w, 3) raw pixels.
        image: RGB uint8 (H, W, 3).
        tiled: tile_size, overlap, mode and batch_size (the config's tiled_infer section).
        threshold: binary foreground threshold on the probability.
        interpolation: image resizing (tiles and whole image) to the model's size.
        tta: flip averaging of every forward pass (see `forward`).
    """
    stitch = "context" if tiled.mode == "bitwise_blending" else tiled.mode
    probs = tiled_probs(model, image, tile_size=tiled.tile_size, overlap=tiled.overlap, mode=stitch,
                        batch_size=tiled.batch_size, interpolation=interpolation, tta=tta)
    labels = to_labels(probs, threshold)
    if tiled.mode == "bitwise_blending":
        whole = to_labels(upsize(predict_probs(model, [image], interpolation, tta)[0], *image.shape[:2]), threshold)
        labels = np.where(labels == whole, labels, 0).astype(np.uint8)
    return labels


def tiled_infer_folder(model, images_dir: str | Path, output_dir: str | Path, cfg: Config, *,
                       colorize_masks: bool | None = None, overlays: bool | None = None,
                       tta: bool = False) -> list[Path]:
    """Tiled inference of every image in `images_dir`: `<output>/<stem>.png` masks at the original
    size (as infer_folder writes them), plus colorized/ and overlay/ copies when asked.

    Args:
        model: a Keras model taking (N, h, w, 3) raw pixels.
        images_dir: folder of images of any size.
        output_dir: folder for the masks (created).
        cfg: tiled_infer (tiles), infer (threshold, colorize, overlay, alpha), data
            (image_interpolation) and the palette.
        colorize_masks, overlays: override infer.colorize / infer.overlay when not None.
        tta: flip averaging (see `forward`).
    """
    colorize_masks = cfg.infer.colorize if colorize_masks is None else colorize_masks
    overlays = cfg.infer.overlay if overlays is None else overlays
    output_dir = _prepare_output(output_dir, colorize_masks, overlays)
    binary = model.output_shape[-1] == 1
    palette = cfg.palette()
    written = []
    # one image at a time: a large image is already many batches of tiles
    settings = dataclasses.replace(Settings.from_config(cfg, "tiled", tta), batch_size=1)
    for path, image, labels in predict_files(model, list_images(images_dir), settings):
        written.append(write_outputs(output_dir, path.stem, image, labels, palette, binary,
                                     colorize_masks, overlays, cfg.infer.overlay_alpha))
    return written
