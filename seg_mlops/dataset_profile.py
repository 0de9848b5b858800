"""What a dataset looks like, as stored: image sizes and channels, and how big its objects are.

`data.prepare` already counts pairs and class pixels for every split; this adds the shape of the
data that planning (`seg-mlops plan`) needs and that a reader of a run wants to see: the images'
sizes (median and spread), their channels (and whether colour files hold grey content), and the
connected components of each foreground class in the masks at their stored size: how many per
image, their median area, equivalent diameter and thickness (the diameter of the largest disk
inside a component), and the class's typical width (`width_px`, from the mean distance of its
pixels to the background: right for networks such as membranes, whose components are few and
huge). Objects must stay several pixels wide at the model's input size, which is what the
planner's size rule checks.

A seeded sample of the train split is described (SAMPLE pairs at most): sizes and object shapes
are stable long before every file is read, and the full pass over every file is data.validate's.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import cv2
import numpy as np

from seg_mlops import data
from seg_mlops.config import Config

SAMPLE = 64  # train pairs described at most


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, 10th and 90th percentile, min and max (empty: all NaN)."""
    v = np.asarray(values, dtype=np.float64)
    if not v.size:
        return {k: float("nan") for k in ("median", "p10", "p90", "min", "max")}
    return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90)),
            "min": float(v.min()), "max": float(v.max())}


def grey_content(image: np.ndarray) -> bool:
    """Whether a stored image is grey: one channel, or colour channels that are all equal (up to
    2 levels of JPEG noise)."""
    if image.ndim == 2 or image.shape[2] == 1:
        return True
    colour = image[..., :3].astype(np.int16)
    return bool(np.abs(colour - colour[..., :1]).max() <= 2)


def objects(labels: np.ndarray, cls: int) -> tuple[list[tuple[int, float]], float]:
    """(area, thickness) in pixels of each 8-connected component of class `cls` in a label image,
    and the sum of the class's pixels' distances to the background (for `width_px`)."""
    mask = (labels == cls).astype(np.uint8)
    count, components = cv2.connectedComponents(mask, connectivity=8)
    if count <= 1:
        return [], 0.0
    inside = cv2.distanceTransform(mask, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)  # exact distance to the background
    areas = np.bincount(components.ravel(), minlength=count)
    deepest = np.zeros(count, np.float32)
    np.maximum.at(deepest, components.ravel(), inside.ravel())
    return [(int(areas[i]), float(2 * deepest[i])) for i in range(1, count)], float(inside.sum())


def describe_pair(pair: data.Pair, cfg: Config) -> dict:
    """One pair's size, channels, grey content and objects per foreground class."""
    image = data.decode_file(pair.image)
    labels = data.encode_mask(data.read_mask(pair.mask, cfg.model.num_classes), cfg.data,
                              cfg.model.num_classes, str(pair.mask))
    classes = max(cfg.model.num_classes, 2)
    return {"height": image.shape[0], "width": image.shape[1],
            "channels": 1 if image.ndim == 2 else image.shape[2], "grey": grey_content(image),
            "objects": {c: objects(labels, c) for c in range(1, classes)}}


def summarize(pairs: list[dict], classes: int) -> dict:
    """The described pairs in numbers: sizes, channels, grey share, objects per class."""
    channels = [p["channels"] for p in pairs]
    shape = {"described": len(pairs), "height": spread([p["height"] for p in pairs]),
             "width": spread([p["width"] for p in pairs]),
             "channels": {str(c): channels.count(c) for c in sorted(set(channels))},
             "grey_content": round(float(np.mean([p["grey"] for p in pairs])) if pairs else float("nan"), 4)}
    found = {}
    for c in range(1, max(classes, 2)):
        per_image = [p["objects"][c] for p in pairs]
        every = [o for found_here, _ in per_image for o in found_here]
        areas = [a for a, _ in every]
        depth = sum(d for _, d in per_image)
        found[str(c)] = {"per_image": spread([len(o) for o, _ in per_image]), "area_px": spread(areas),
                         "diameter_px": spread([np.sqrt(4 * a / np.pi) for a in areas]),
                         "thickness_px": spread([t for _, t in every]),
                         # the class's typical width, whatever the shape of its components (a
                         # network of membranes is one component; its width is what matters):
                         # from the mean distance of its pixels to the background (a border
                         # pixel's is 1), so a strip of width w gives w and a disk of diameter d 2/3 d
                         "width_px": round(4 * (depth / sum(areas) - 0.5), 2) if areas else float("nan")}
    shape["objects"] = found
    return shape


def describe(cfg: Config, split: str = "train", sample: int = SAMPLE, workers: int = 4) -> dict:
    """The shape of `split` (a seeded sample of `sample` pairs): see the module docstring. `cfg`
    must have its mask encoding decided (data.prepare)."""
    pairs = data.split_pairs(cfg, split)
    if len(pairs) > sample:
        pairs = sorted(random.Random(cfg.seed).sample(pairs, sample), key=lambda p: p.image.name)
    with ThreadPoolExecutor(workers) as pool:  # cv2 releases the GIL
        described = list(pool.map(lambda p: describe_pair(p, cfg), pairs))
    return summarize(described, cfg.model.num_classes)
