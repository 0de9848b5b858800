"""Generate a small, deterministic, cell-like image/mask dataset: the embedded demo data and the test data."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# Class i is drawn in PALETTE[i] in RGB multiclass masks; class 0 is always background.
PALETTE: list[tuple[int, int, int]] = [(0, 0, 0), (0, 255, 0), (255, 0, 0), (0, 0, 255), (255, 255, 0)]

SPLITS = ("train", "valid", "test")

# Internal labels, chosen so that they equal the class indices when classes >= 3.
_BG, _CYTO, _NUCLEUS, _ROD, _DEBRIS = range(5)

# Reflectance (fraction of the background level) per RGB channel. Cytoplasm and the
# rod-shaped second cell type differ in tint as well as brightness, nuclei are clearly darker:
# the gaps are a few times the pixel noise, so a tiny UNet learns them quickly.
_BG_TINT = np.array([1.0, 0.97, 1.0])
_CYTO_TINT = np.array([0.80, 0.86, 0.74])
_ROD_TINT = np.array([0.74, 0.76, 0.96])
_NUCLEUS_TINT = np.array([0.42, 0.36, 0.55])
_DEBRIS_TINT = np.array([0.35, 0.35, 0.35])


def _check(classes: int, size: int) -> None:
    if not 1 <= classes <= len(PALETTE):
        raise ValueError(f"classes must be between 1 and {len(PALETTE)}, got {classes}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")


def rgb_map(classes: int) -> list[list[int]]:
    """Return the mask colours of a multiclass dataset, for the config's ``data.rgb_map``.

    Args:
        classes: number of classes, 2 to 5 (binary datasets use greyscale masks, not a colour map).

    Returns:
        The first ``classes`` PALETTE colours as ``[r, g, b]`` lists; index i is class i.
    """
    if not 2 <= classes <= len(PALETTE):
        raise ValueError(f"rgb_map needs 2 to {len(PALETTE)} classes, got {classes}")
    return [list(c) for c in PALETTE[:classes]]


def _ellipse(size: int, centre: tuple[int, int], axes: tuple[int, int], angle: float) -> np.ndarray:
    """A filled ellipse as a boolean (size, size) array."""
    canvas = np.zeros((size, size), np.uint8)
    cv2.ellipse(canvas, centre, axes, angle, 0, 360, 1, thickness=-1)
    return canvas.astype(bool)


def _texture(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Smooth noise with unit standard deviation, the grainy look of cytoplasm."""
    field = cv2.GaussianBlur(rng.normal(size=(size, size)).astype(np.float32), (0, 0), sigma)
    return field / (field.std() + 1e-6)


def make_pair(rng: np.random.Generator, *, size: int = 128, classes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic microscopy image and its ground-truth mask.

    Args:
        rng: random generator; the pair is a pure function of its state.
        size: side of the square image in pixels (at least 16).
        classes: 1 for a binary cell/background mask; 2 background/cell; 3 background/cytoplasm/nucleus;
            4 adds an elongated second cell type (class 3); 5 adds small debris blobs (class 4).

    Returns:
        ``(image, mask)``: image is uint8 (size, size, 3) RGB. With classes == 1 the mask is uint8
        (size, size) with values {0, 255}; otherwise it is uint8 (size, size, 3) RGB where every pixel
        is one of the first ``classes`` PALETTE colours.
    """
    _check(classes, size)
    level = rng.uniform(150, 200)  # background brightness before the per-image contrast change
    refl = np.broadcast_to(_BG_TINT, (size, size, 3)).copy()
    label = np.zeros((size, size), np.uint8)
    texture = _texture(rng, size, sigma=max(size / 64, 0.8))

    for _ in range(rng.integers(2, 9)):
        rod = classes >= 4 and rng.random() < 0.35
        # Semi-major axis 8-25% of the image side; at least 4 px so the nucleus survives on tiny images.
        major = max(4.0, size * rng.uniform(0.08, 0.25))
        minor = major * (rng.uniform(0.25, 0.45) if rod else rng.uniform(0.6, 1.0))
        centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))  # cells may touch the border
        angle = rng.uniform(0, 180)
        body = _ellipse(size, centre, (round(major), max(1, round(minor))), angle)

        tint = (_ROD_TINT if rod else _CYTO_TINT) * rng.uniform(0.95, 1.05, 3)
        refl[body] = tint + 0.06 * texture[body, None]
        # Later cells overwrite earlier ones, in the mask exactly as in the image.
        label[body] = _ROD if rod else _CYTO

        # Nucleus: same orientation, at most 45% of the body's axes, shifted along the major axis
        # by at most 0.3 * (1 - 0.45) of it, so it stays inside the body.
        scale = rng.uniform(0.3, 0.45)
        shift = rng.uniform(-0.3, 0.3) * (1 - scale) * major
        rad = np.deg2rad(angle)
        n_centre = (round(centre[0] + shift * np.cos(rad)), round(centre[1] + shift * np.sin(rad)))
        nucleus = body & _ellipse(size, n_centre, (max(1, round(major * scale)), max(1, round(minor * scale))), angle)
        refl[nucleus] = _NUCLEUS_TINT * rng.uniform(0.9, 1.1) + 0.04 * texture[nucleus, None]
        if not rod:  # the rod type is one class over its whole body
            label[nucleus] = _NUCLEUS

    if classes == 5:
        for _ in range(rng.integers(1, 5)):
            centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
            radius = max(1, round(size * rng.uniform(0.015, 0.04)))
            blob = _ellipse(size, centre, (radius, max(1, round(radius * rng.uniform(0.5, 1.0)))), rng.uniform(0, 180))
            refl[blob] = _DEBRIS_TINT
            label[blob] = _DEBRIS

    # Uneven illumination: a linear ramp in a random direction, multiplying everything.
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    theta = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0.1, 0.3) * (xx * np.cos(theta) + yy * np.sin(theta))
    img = (level * refl * light[..., None]).astype(np.float32)

    # Optics blur the edges; camera noise comes after the optics.
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.6, 1.2))
    img += rng.normal(0, 5, img.shape).astype(np.float32)
    # Per-image contrast and brightness, as between acquisitions.
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.8, 1.2) + mean + rng.uniform(-20, 20)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    if classes == 1:
        return image, np.where(label > 0, 255, 0).astype(np.uint8)
    if classes == 2:
        label = np.minimum(label, 1)  # cytoplasm and nucleus are both "cell"
    return image, np.array(PALETTE[:classes], np.uint8)[label]


def make_dataset(
    root: str | Path,
    *,
    classes: int = 1,
    size: int = 128,
    counts: tuple[int, int, int] = (64, 16, 16),
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset as PNG files: ``<root>/{train,valid,test}/{images,masks}/cell_NNNN.png``.

    Images are RGB PNGs; binary masks are 8-bit greyscale 0/255, multiclass masks RGB PNGs in PALETTE colours.
    An image and its mask share the file name. The same arguments always give byte-identical files.

    Args:
        root: folder to write into (created if missing; existing files of the same name are overwritten).
        classes: 1 (binary) to 5, see ``make_pair``.
        size: side of the square images in pixels (at least 16).
        counts: number of (train, valid, test) pairs.
        seed: seed of the dataset; each split gets its own generator derived from it.

    Returns:
        ``Path(root)``.
    """
    _check(classes, size)
    if len(counts) != len(SPLITS) or any(n < 0 for n in counts):
        raise ValueError(f"counts must be three non-negative numbers (train, valid, test), got {counts}")
    root = Path(root)
    for split_index, (split, count) in enumerate(zip(SPLITS, counts)):
        # One generator per split, so changing one split's count leaves the other splits unchanged.
        rng = np.random.default_rng([seed, split_index])
        images, masks = root / split / "images", root / split / "masks"
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = make_pair(rng, size=size, classes=classes)
            name = f"cell_{i:04d}.png"
            # cv2 writes BGR: flip the channel order of the RGB arrays (greyscale masks have none).
            cv2.imwrite(str(images / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(masks / name), mask if mask.ndim == 2 else cv2.cvtColor(mask, cv2.COLOR_RGB2BGR))
    return root
