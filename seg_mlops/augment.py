"""Online augmentation of training pairs inside tf.data: one random geometric field per sample.

Each op of `AugmentConfig` fires independently per sample with its probability. All geometric ops
(flips, rotation, shrink, shear, barrel, pincushion, grid distortion, elastic deformation, smooth
distortion) are composed into ONE backward coordinate map (output pixel -> source position), and
that one map samples the image bilinearly and the label map by nearest neighbour: image and mask
get the same field (the reference warped masks with a different field, B6) and labels stay labels
(its bilinear mask warps dilated them, B8). Sharpening and brightening then change the image only
(the reference changed masks too, B7).

Everything is TensorFlow ops on the decoded uint8 pair, so `Dataset.map(num_parallel_calls=
AUTOTUNE)` runs samples in parallel without the GIL. Random draws are stateless ops keyed by a
per-sample seed from `tf.data.Dataset.random(cfg.seed, rerandomize_each_iteration=True)`: the
same seed gives the same augmented epochs, every sample and every epoch draws anew.

Conventions: coordinates are pixel indices (x right, y down; pixel centres at integers), centres
of rotation/shrink/shear are the image centre ((W-1)/2, (H-1)/2); positions that fall outside the
image are mirrored back (reflect-101, as OpenCV's default BORDER_REFLECT_101 and albumentations'
default), so borders repeat image content, never a constant colour, and the mask mirrors with it.
"""

from __future__ import annotations

import math
from typing import Callable

from seg_mlops.config import AugmentConfig

# Order of the per-sample "does this op fire" draws; image-only ops last.
OPS = ("hflip", "vflip", "rotation", "shrink", "shear", "barrel", "pincushion", "grid",
       "deformation", "distortion", "sharpening", "brightening")
GEOMETRIC = OPS[:10]  # warp image and mask; the rest change the image only
TRUNCATE = 3.0  # Gaussian kernels end at 3 sigma (0.3 % of the 1-D weight beyond; scipy uses 4)


def enabled(aug: AugmentConfig) -> bool:
    """True when at least one op has a probability above 0."""
    return any(getattr(aug, op) > 0 for op in OPS)


def augment_dataset(ds, aug: AugmentConfig, seed: int, height: int, width: int):
    """Augment a dataset of (uint8 image (H, W, 3), uint8 labels (H, W)) pairs.

    Args:
        ds: the decoded pairs (after any cache and shuffle, so cached pairs are re-augmented).
        aug: the augment section of the config.
        seed: the experiment seed; the same seed gives the same augmented epochs.
        height, width: the pair size (static, the model's input size).

    Returns:
        The dataset of augmented pairs, same dtypes and shapes, same order.
    """
    import tensorflow as tf

    # One 2-int64 stateless seed per sample; rerandomize_each_iteration draws a new sequence
    # every epoch (every new iterator), still determined by `seed`.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    fn = make_augmenter(aug, height, width)
    return tf.data.Dataset.zip(ds, seeds).map(
        lambda pair, s: fn(pair[0], pair[1], s), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def make_augmenter(aug: AugmentConfig, height: int, width: int) -> Callable:
    """The per-sample function `(image uint8 (H,W,3), labels uint8 (H,W), seed int64 [2]) ->
    (image, labels)`, built from TensorFlow ops (usable eagerly or inside Dataset.map).

    Args:
        aug: the augment section of the config (ops with probability 0 are not even built).
        height, width: the pair size.
    """
    import tensorflow as tf

    frame = _Frame(aug, height, width)
    probs = tf.constant([getattr(aug, op) for op in OPS], tf.float32)
    active = {op for op in OPS if getattr(aug, op) > 0}

    def augment(image, labels, seed):
        # One seed per op (its index in OPS), the last one draws which ops fire.
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), len(OPS) + 1)
        fires = tf.unstack(tf.random.stateless_uniform([len(OPS)], seeds[-1]) < probs)
        draws = {op: (fires[i], seeds[i]) for i, op in enumerate(OPS) if op in active}
        pixels = tf.cast(image, tf.float32)
        if active & set(GEOMETRIC):
            def warp():
                x, y = _coordinates(frame, draws)
                return _remap(frame, image, labels, x, y)
            pixels, labels = tf.cond(tf.reduce_any(tf.stack(fires[:len(GEOMETRIC)])), warp,
                                     lambda: (pixels, labels))
        for op, change in _IMAGE_OPS.items():
            if op in draws:
                pixels = tf.cond(draws[op][0], lambda change=change: change(aug, pixels), lambda: pixels)
        # Whole-valued floats round back to the same uint8: a sample no op touched stays identical.
        image = tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8)
        return tf.ensure_shape(image, [height, width, 3]), tf.ensure_shape(labels, [height, width])

    return augment


class _Frame:
    """What every op needs besides its own draws: the config, the pair size, and the pixel grid."""

    def __init__(self, aug: AugmentConfig, height: int, width: int):
        import tensorflow as tf

        self.aug, self.height, self.width = aug, height, width
        self.cx, self.cy = (width - 1) / 2.0, (height - 1) / 2.0
        self.grid_y, self.grid_x = tf.meshgrid(tf.range(height, dtype=tf.float32),
                                               tf.range(width, dtype=tf.float32), indexing="ij")


def _coordinates(frame: _Frame, draws: dict):
    """Backward map: source (x, y) of every output pixel, the active ops composed in the order of
    the tables below (fields, then warps, then the affine matrix about the centre).

    `draws` maps each active op to (fires, seed); tf.cond, not tf.where: an op that does not fire
    costs nothing.
    """
    import tensorflow as tf

    x, y = frame.grid_x, frame.grid_y
    fields = [op for op in _FIELDS if op in draws]
    if fields:
        zeros = tf.zeros([frame.height, frame.width, 2])
        total = zeros
        for op in fields:
            fires, seed = draws[op]
            total += tf.cond(fires, lambda op=op, seed=seed: _FIELDS[op](frame, seed), lambda: zeros)
        x, y = x + total[..., 0], y + total[..., 1]
    for op, warp in _WARPS.items():
        if op in draws:
            fires, seed = draws[op]
            x, y = tf.cond(fires, lambda warp=warp, x=x, y=y, seed=seed: warp(frame, x, y, seed),
                           lambda x=x, y=y: (x, y))
    a = tf.eye(2)
    for op, matrix in _MATRICES.items():
        if op in draws:
            fires, seed = draws[op]
            a = a @ tf.where(fires, matrix(frame.aug, seed), tf.eye(2))
    u, v = x - frame.cx, y - frame.cy
    return frame.cx + a[0, 0] * u + a[0, 1] * v, frame.cy + a[1, 0] * u + a[1, 1] * v


# ----------------------------------------------------------------------------- the ops

def _pick(values, seed):
    """One entry of a config list, drawn uniformly."""
    import tensorflow as tf

    table = tf.constant(values, tf.float32)
    index = tf.random.stateless_uniform([], seed, 0, len(values), dtype=tf.int32)
    return tf.gather(table, index)


# Affine ops: the 2x2 backward matrix of each (the inverse of the op), (aug, seed) -> matrix.
# Multiplied in this order, A = F R S H: the image sees shear first, then shrink, rotation, flips.

def _hflip(aug: AugmentConfig, seed):
    import tensorflow as tf

    return tf.constant([[-1.0, 0.0], [0.0, 1.0]])


def _vflip(aug: AugmentConfig, seed):
    import tensorflow as tf

    return tf.constant([[1.0, 0.0], [0.0, -1.0]])


def _rotation(aug: AugmentConfig, seed):
    import tensorflow as tf

    theta = _pick(aug.angles, seed) * (math.pi / 180.0)
    c, s = tf.cos(theta), tf.sin(theta)
    return tf.stack([tf.stack([c, -s]), tf.stack([s, c])])


def _shrink(aug: AugmentConfig, seed):
    import tensorflow as tf

    return tf.eye(2) / _pick(aug.shrinks, seed)


def _shear(aug: AugmentConfig, seed):
    """Reference: vertical shear y' = y + k (x - cx)."""
    import tensorflow as tf

    k = _pick(aug.shears, seed)
    return tf.stack([tf.stack([1.0, 0.0]), tf.stack([-k, 1.0])])


# Warps: (frame, x, y, seed) -> the source positions (x, y) moved.

def _grid(frame: _Frame, x, y, seed):
    """Grid distortion, each axis with its own draw."""
    import tensorflow as tf

    y_seed = tf.random.experimental.stateless_fold_in(seed, 1)
    return _grid_axis(frame.aug, x, seed, frame.width), _grid_axis(frame.aug, y, y_seed, frame.height)


def _grid_axis(aug: AugmentConfig, coord, seed, size: int):
    """Grid distortion along one axis: grid_steps equal output cells map to source cells
    stretched by random factors in [1 - limit, 1 + limit] (rescaled to the same total)."""
    import tensorflow as tf

    steps = aug.grid_steps
    factors = tf.random.stateless_uniform([steps], seed, 1.0 - aug.grid_limit, 1.0 + aug.grid_limit)
    cell = max(size - 1, 1) / steps
    widths = factors / tf.reduce_sum(factors) * (steps * cell)
    starts = tf.concat([[0.0], tf.cumsum(widths)[:-1]], 0)
    k = tf.clip_by_value(tf.cast(tf.floor(coord / cell), tf.int32), 0, steps - 1)
    return tf.gather(starts, k) + (coord - tf.cast(k, tf.float32) * cell) * tf.gather(widths / cell, k)


def _pincushion(frame: _Frame, x, y, seed):
    a = frame.aug
    return _radial(frame, x, y, seed, a.pincushion_centers, a.pincushion_radius, a.pincushion_amount)


def _barrel(frame: _Frame, x, y, seed):
    a = frame.aug
    return _radial(frame, x, y, seed, a.barrel_centers, a.barrel_radius, a.barrel_amount)


def _radial(frame: _Frame, x, y, seed, centers, radius, amount):
    """Barrel (amount > 0) / pincushion (< 0) inside a circle of radius x width around a drawn
    centre: a point at distance r samples centre + delta * sin(pi r / 2R) ** amount."""
    import tensorflow as tf

    table = tf.constant(centers, tf.float32)
    centre = tf.gather(table, tf.random.stateless_uniform([], seed, 0, len(centers), dtype=tf.int32))
    bx, by = centre[0] * (frame.width - 1), centre[1] * (frame.height - 1)
    big_r = radius * frame.width
    dx, dy = x - bx, y - by
    r = tf.sqrt(dx * dx + dy * dy)
    inside = r < big_r
    # r = 0 would give 0 ** negative = inf; the factor there multiplies delta = 0 anyway.
    safe = tf.where(inside & (r > 0), r, big_r)
    factor = tf.pow(tf.sin(math.pi * safe / (2.0 * big_r)), amount)
    return tf.where(inside, bx + dx * factor, x), tf.where(inside, by + dy * factor, y)


# Displacement fields: (frame, seed) -> (dx, dy) per output pixel, float32 (H, W, 2).

def _deformation(frame: _Frame, seed):
    """Elastic (Simard), with one of the configured sigmas."""
    import tensorflow as tf

    sigmas = list(frame.aug.deformation_sigmas)
    index = tf.random.stateless_uniform([], seed, 0, len(sigmas), dtype=tf.int32)
    noise_seed = tf.random.experimental.stateless_fold_in(seed, 1)
    # One branch per configured sigma: each kernel (and canvas) keeps a static size.
    branches = [lambda s=s: elastic_field(frame.height, frame.width, s, frame.aug.deformation_alpha, noise_seed)
                for s in sigmas]
    return tf.switch_case(index, branches)


def _distortion(frame: _Frame, seed):
    import tensorflow as tf

    fraction = _pick(frame.aug.distortions, seed)
    noise_seed = tf.random.experimental.stateless_fold_in(seed, 1)
    # reference: p - d
    return -distortion_field(frame.height, frame.width, frame.aug.distortion_sigma, fraction, noise_seed)


# Image-only ops: (aug, float32 pixels) -> pixels, applied after the warp.

def _sharpen(aug: AugmentConfig, pixels):
    """3x3 kernel -k around, 1 + 8k in the centre (reflect-101 border, as cv2.filter2D)."""
    import tensorflow as tf

    k = aug.sharpening_k
    kernel = tf.constant([[-k, -k, -k], [-k, 1 + 8 * k, -k], [-k, -k, -k]], tf.float32)
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    padded = tf.pad(pixels[None], [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")
    out = tf.nn.depthwise_conv2d(padded, kernel, [1, 1, 1, 1], "VALID")[0]
    return tf.clip_by_value(out, 0.0, 255.0)  # cv2.filter2D on uint8 saturates likewise


def _brighten(aug: AugmentConfig, pixels):
    """pixel * alpha + beta; saturated to 0..255 by the final cast (cv2.convertScaleAbs would also
    mirror negative values, which only a negative beta can produce; clipping keeps dark dark)."""
    return pixels * aug.brightening_alpha + aug.brightening_beta


# Every op of OPS (its probability is the AugmentConfig field of the same name) in one table each,
# in the order it is applied.
_FIELDS = {"deformation": _deformation, "distortion": _distortion}
_WARPS = {"grid": _grid, "pincushion": _pincushion, "barrel": _barrel}
_MATRICES = {"hflip": _hflip, "vflip": _vflip, "rotation": _rotation, "shrink": _shrink, "shear": _shear}
_IMAGE_OPS = {"sharpening": _sharpen, "brightening": _brighten}


# ----------------------------------------------------------------------------- sampling

def _reflect(coord, size: int):
    """Mirror positions outside [0, size-1] back inside (reflect-101: the edge pixel is the
    mirror's axis and is not repeated)."""
    import tensorflow as tf

    if size == 1:
        return tf.zeros_like(coord)
    period = 2.0 * (size - 1)
    coord = tf.math.floormod(coord, period)
    return tf.where(coord > size - 1, period - coord, coord)


def _remap(frame: _Frame, image, labels, x, y):
    """Sample the uint8 image bilinearly (-> float32) and the labels by nearest neighbour at
    (x, y). The four neighbours come from one gather of uint8 pixels (the cheapest form)."""
    import tensorflow as tf

    height, width = frame.height, frame.width
    x, y = _reflect(x, width), _reflect(y, height)
    x0f, y0f = tf.floor(x), tf.floor(y)
    fx, fy = (x - x0f)[..., None], (y - y0f)[..., None]
    x0, y0 = tf.cast(x0f, tf.int32), tf.cast(y0f, tf.int32)
    x1, y1 = tf.minimum(x0 + 1, width - 1), tf.minimum(y0 + 1, height - 1)
    index = tf.stack([y0 * width + x0, y0 * width + x1, y1 * width + x0, y1 * width + x1])
    v = tf.cast(tf.gather(tf.reshape(image, [height * width, 3]), index), tf.float32)
    top = v[0] + (v[1] - v[0]) * fx
    bottom = v[2] + (v[3] - v[2]) * fx
    nearest = tf.cast(tf.round(y), tf.int32) * width + tf.cast(tf.round(x), tf.int32)
    return top + (bottom - top) * fy, tf.gather(tf.reshape(labels, [-1]), nearest)


# ----------------------------------------------------------------------------- random fields

def _kernel(sigma: float, order: int):
    """1-D Gaussian kernel (order 0, sums to 1) or its first derivative (order 1), and its radius."""
    import tensorflow as tf

    radius = max(1, int(math.ceil(TRUNCATE * sigma)))
    t = tf.range(-radius, radius + 1, dtype=tf.float32)
    g = tf.exp(-0.5 * (t / sigma) ** 2)
    g = g / tf.reduce_sum(g)
    return (-t / sigma ** 2 * g if order else g), radius


def _smooth_noise(height: int, width: int, sigma: float, orders: list[tuple[int, int]], *,
                  shared: bool, noise):
    """Gaussian-filtered white noise on the (height, width) pixel grid, one channel per (order_y,
    order_x) pair (0: smooth, 1: first derivative), all from the same noise.

    A field smoothed with sigma holds no detail finer than sigma, so it is filtered on a coarse
    grid (spacing about sigma/4 px, where the kernel is 4 coarse px wide) and resized bilinearly
    to the pixel grid: ~16x fewer pixels and 4x shorter kernels than filtering at full size, for
    the same statistics. The noise canvas extends past the image by the kernel radius and is
    filtered without padding, so the border behaves like the middle.

    Args:
        height, width: the output grid.
        sigma: the smoothing sigma in output pixels.
        orders: derivative order along (y, x) of each output channel.
        shared: one noise image for every channel (True) or one per channel.
        noise: `noise(shape, std)` -> white noise of that shape and standard deviation.

    Returns:
        float32 (height, width, len(orders)); derivatives are per output pixel.
    """
    import tensorflow as tf

    spacing = max(1.0, sigma / 4.0)
    coarse_h = int(math.ceil((height - 1) / spacing)) + 1 if height > 1 else 1
    coarse_w = int(math.ceil((width - 1) / spacing)) + 1 if width > 1 else 1
    # The real spacings, so the coarse grid's corners land exactly on the image corners.
    sy = (height - 1) / (coarse_h - 1) if coarse_h > 1 else 1.0
    sx = (width - 1) / (coarse_w - 1) if coarse_w > 1 else 1.0
    (gy, ry), (dgy, _) = _kernel(sigma / sy, 0), _kernel(sigma / sy, 1)
    (gx, rx), (dgx, _) = _kernel(sigma / sx, 0), _kernel(sigma / sx, 1)
    # Filtering fewer, coarser samples averages less: white noise of variance v per pixel is
    # matched by variance v / (sy * sx) per coarse sample (same covariance after smoothing).
    channels = 1 if shared else len(orders)
    samples = noise([1, coarse_h + 2 * ry, coarse_w + 2 * rx, channels], 1.0 / math.sqrt(sy * sx))
    if shared:
        samples = tf.tile(samples, [1, 1, 1, len(orders)])
    ky = tf.stack([dgy / sy if oy else gy for oy, _ in orders], -1)[:, None, :, None]
    kx = tf.stack([dgx / sx if ox else gx for _, ox in orders], -1)[None, :, :, None]
    out = tf.nn.depthwise_conv2d(samples, ky, [1, 1, 1, 1], "VALID")
    out = tf.nn.depthwise_conv2d(out, kx, [1, 1, 1, 1], "VALID")
    if (coarse_h, coarse_w) != (height, width):
        out = tf.raw_ops.ResizeBilinear(images=out, size=[height, width], align_corners=True)
    return out[0]


def elastic_field(height: int, width: int, sigma: float, alpha: float, seed):
    """Simard's elastic displacement (dx, dy): U(-1, 1) noise per axis, Gaussian-smoothed with
    sigma, times alpha (scipy's gaussian_filter(rand*2-1, sigma) * alpha, as the reference).

    Args:
        height, width: the image size (px).
        sigma: smoothing sigma (px); larger is smoother.
        alpha: strength; the displacement's standard deviation is alpha / (2 sqrt(3 pi) sigma) px.
        seed: stateless seed, int [2].

    Returns:
        float32 (height, width, 2): dx, dy in pixels.
    """
    import tensorflow as tf

    # Independent noise for dx and dy; U(-1, 1) rescaled keeps its distribution's shape.
    field = _smooth_noise(height, width, sigma, [(0, 0), (0, 0)], shared=False,
                          noise=lambda shape, std: tf.random.stateless_uniform(shape, seed, -1.0, 1.0) * std)
    return field * alpha


def distortion_field(height: int, width: int, sigma: float, fraction: float, seed):
    """The reference's [distortion] displacement (dx, dy): the gradient of Gaussian-smoothed
    N(0, 1) noise (dx its x-derivative, dy its y-derivative, as scipy's gaussian_filter order
    (0, 1) and (1, 0)), each scaled so its largest |value| is fraction x max(height, width) px.

    Args:
        height, width: the image size (px).
        sigma: smoothing sigma (px), the reference's gaussian_filter_rsigma.
        fraction: largest displacement as a fraction of the larger side.
        seed: stateless seed, int [2].

    Returns:
        float32 (height, width, 2): dx, dy in pixels.
    """
    import tensorflow as tf

    field = _smooth_noise(height, width, sigma, [(0, 1), (1, 0)], shared=True,
                          noise=lambda shape, std: tf.random.stateless_normal(shape, seed) * std)
    peak = tf.maximum(tf.reduce_max(tf.abs(field), axis=[0, 1]), 1e-12)
    return field * (fraction * max(height, width) / peak)
