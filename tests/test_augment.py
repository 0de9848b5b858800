"""Online augmentation: every op keeps image and mask aligned, labels stay labels, the train split
only is augmented, and the draws are seeded per sample and per epoch."""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import pytest
import tensorflow as tf

from seg_mlops import augment, config, data
from seg_mlops.config import AugmentConfig
from seg_mlops.errors import SegMlopsError
from tests.conftest import numpy_scores, real_data

GEOMETRIC = {  # op -> extra settings that make the op visible on a 48 px image
    "hflip": {}, "vflip": {}, "rotation": {"angles": (30.0, 135.0)}, "shrink": {"shrinks": (0.7,)},
    "shear": {"shears": (0.3,)}, "barrel": {}, "pincushion": {}, "grid": {},
    "deformation": {"deformation_alpha": 400.0, "deformation_sigmas": (4.0, 6.0)},
    "distortion": {"distortions": (0.05,), "distortion_sigma": 10.0},
}
# A full set, as a config would enable it: every op may fire on a sample.
FULL = dict(hflip=0.5, vflip=0.5, rotation=0.5, shrink=0.3, shear=0.3, barrel=0.3, pincushion=0.3,
            grid=0.3, deformation=0.3, distortion=0.3, sharpening=0.3, brightening=0.3,
            angles=(90.0, 180.0, 270.0, 30.0))


def _smooth_image(size: int = 48, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric grey image (blobs on a ramp), uint8 (size, size, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    value = 40 + 60 * xx / size
    for _ in range(4):
        cx, cy, r = rng.uniform(8, size - 8), rng.uniform(8, size - 8), rng.uniform(4, 9)
        value += 170 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r ** 2))
    grey = np.clip(value, 0, 255).astype(np.uint8)
    return np.stack([grey, grey, grey], -1)


def _labels(image: np.ndarray) -> np.ndarray:
    """Four classes 0..3 that are the image's own grey levels (so a pair stays aligned exactly
    when thresholding the warped image gives the warped labels); binary mask = labels >= 2."""
    return np.digitize(image[..., 0], [64, 128, 192]).astype(np.uint8)


def _run(aug: AugmentConfig, image: np.ndarray, labels: np.ndarray, seed=(1, 2)):
    fn = augment.make_augmenter(aug, image.shape[0], image.shape[1])
    out_image, out_labels = fn(image, labels, tf.constant(seed, tf.int64))
    return out_image.numpy(), out_labels.numpy()


# ----------------------------------------------------------------------------- per op

@pytest.mark.parametrize("op", sorted(GEOMETRIC))
def test_geometric_op_warps_image_and_mask_with_one_field(op):
    image = _smooth_image()
    labels = _labels(image)
    aug = AugmentConfig(**{op: 1.0}, **GEOMETRIC[op])
    for seed in [(1, 2), (7, 8), (99, 3)]:
        out_image, out_labels = _run(aug, image, labels, seed)
        assert out_image.dtype == np.uint8 and out_image.shape == image.shape
        assert out_labels.dtype == np.uint8 and out_labels.shape == labels.shape
        assert np.mean(out_image != image) > 0.05 and np.mean(out_labels != labels) > 0.01
        assert set(np.unique(out_labels).tolist()) <= {0, 1, 2, 3}  # nearest: no new label values
        # Aligned: the mask is still the image's own threshold (bilinear vs nearest only differ
        # on boundary pixels); binary (>= 128) and all four classes.
        binary = np.mean((out_image[..., 0] >= 128) == (out_labels >= 2))
        multiclass = np.mean(_labels(out_image) == out_labels)
        assert binary > 0.97, (seed, binary)
        assert multiclass > 0.95, (seed, multiclass)
        # The channels moved together (the image is grey in, grey out).
        np.testing.assert_array_equal(out_image[..., 0], out_image[..., 2])


def test_alignment_check_catches_a_mask_warped_with_another_field():
    """What the reference did (B6): the same op, a different random field for the mask."""
    image = _smooth_image()
    labels = _labels(image)
    aug = AugmentConfig(deformation=1.0, deformation_alpha=400.0, deformation_sigmas=(4.0,))
    out_image, _ = _run(aug, image, labels, (1, 2))
    _, other_labels = _run(aug, image, labels, (5, 6))
    assert np.mean((out_image[..., 0] >= 128) == (other_labels >= 2)) < 0.9


def test_flips_and_right_angle_rotation_are_exact_permutations():
    image = _smooth_image(33)
    labels = _labels(image)
    for op, expect in [("hflip", lambda a: a[:, ::-1]), ("vflip", lambda a: a[::-1]),
                       ("rotation", lambda a: np.rot90(a))]:
        out_image, out_labels = _run(AugmentConfig(**{op: 1.0}, angles=(90.0,)), image, labels)
        np.testing.assert_array_equal(out_image, expect(image), err_msg=op)
        np.testing.assert_array_equal(out_labels, expect(labels), err_msg=op)


def test_shrink_is_centred_and_mirrors_the_border():
    """Shrink 0.5 on 33 px: output (y, x) samples source (2y - 16, 2x - 16), mirrored at the edges
    (reflect-101: -1 -> 1, 33 -> 31)."""
    image = _smooth_image(33)
    labels = _labels(image)
    out_image, out_labels = _run(AugmentConfig(shrink=1.0, shrinks=(0.5,)), image, labels)
    np.testing.assert_array_equal(out_image[8:25, 8:25], image[0:33:2, 0:33:2])
    np.testing.assert_array_equal(out_labels[8:25, 8:25], labels[0:33:2, 0:33:2])
    assert out_labels[0, 0] == labels[16, 16]  # source (-16, -16) mirrors to (16, 16)
    assert out_labels[7, 16] == labels[2, 16]  # source y = -2 mirrors to 2
    assert out_labels[32, 32] == labels[16, 16]  # source (48, 48) mirrors to (16, 16)


def test_image_only_ops_never_change_the_mask():
    image = _smooth_image()
    labels = _labels(image)
    out_image, out_labels = _run(AugmentConfig(brightening=1.0, brightening_alpha=1.2, brightening_beta=10.0),
                                 image, labels)
    np.testing.assert_array_equal(out_labels, labels)
    expected = np.clip(np.round(image.astype(np.float64) * 1.2 + 10), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out_image, expected)

    out_image, out_labels = _run(AugmentConfig(sharpening=1.0, sharpening_k=1.0), image, labels)
    np.testing.assert_array_equal(out_labels, labels)
    kernel = np.array([[-1, -1, -1], [-1, 9, -1], [-1, -1, -1]], np.float32)
    reference = cv2.filter2D(image, -1, kernel)  # uint8, saturated, BORDER_REFLECT_101
    assert np.mean(out_image != image) > 0.3
    assert np.abs(out_image.astype(int) - reference.astype(int)).max() <= 1  # float rounding only


def test_ops_that_do_not_fire_leave_the_pair_bit_identical():
    image = _smooth_image()
    labels = _labels(image)
    # Every op built into the graph but (almost) never drawn: the pair passes through unchanged.
    rare = AugmentConfig(**{op: 1e-9 for op in augment.OPS})
    assert augment.enabled(rare) and not augment.enabled(AugmentConfig())
    for seed in [(1, 2), (3, 4), (5, 6)]:
        out_image, out_labels = _run(rare, image, labels, seed)
        np.testing.assert_array_equal(out_image, image)
        np.testing.assert_array_equal(out_labels, labels)


def test_probability_is_per_sample():
    """hflip at 0.5: about half of 200 samples are flipped, each exactly."""
    image = _smooth_image(16)
    labels = _labels(image)
    fn = augment.make_augmenter(AugmentConfig(hflip=0.5), 16, 16)
    flipped = 0
    for i in range(200):
        out, _ = fn(image, labels, tf.constant([i, 0], tf.int64))
        out = out.numpy()
        assert np.array_equal(out, image) or np.array_equal(out, image[:, ::-1])
        flipped += int(not np.array_equal(out, image))
    assert 75 <= flipped <= 125  # binomial(200, 0.5): mean 100, sd 7


def test_elastic_field_strength_matches_alpha_and_sigma():
    """scipy's gaussian_filter(U(-1, 1), sigma) * alpha has sd alpha / (2 sqrt(3 pi) sigma); the
    coarse-grid filtering must keep it (here 1300 / (2 sqrt(3 pi) 8) = 26.47 px)."""
    sds = [augment.elastic_field(128, 128, 8.0, 1300.0, tf.constant([i, 1], tf.int64)).numpy().std()
           for i in range(8)]
    assert np.mean(sds) == pytest.approx(1300 / (2 * math.sqrt(3 * math.pi) * 8), rel=0.1)
    d = augment.distortion_field(64, 48, 40.0, 0.02, tf.constant([3, 4], tf.int64)).numpy()
    np.testing.assert_allclose(np.abs(d).max(axis=(0, 1)), [0.02 * 64, 0.02 * 64], rtol=1e-5)


def test_full_augmentation_keeps_labels_and_alignment():
    image = _smooth_image()
    labels = _labels(image)
    fn = augment.make_augmenter(AugmentConfig(**{**FULL, "sharpening": 0.0, "brightening": 0.0}), 48, 48)
    agree = []
    for i in range(20):
        out_image, out_labels = (t.numpy() for t in fn(image, labels, tf.constant([i, 9], tf.int64)))
        assert set(np.unique(out_labels).tolist()) <= {0, 1, 2, 3}
        agree.append(np.mean((out_image[..., 0] >= 128) == (out_labels >= 2)))
    assert min(agree) > 0.95 and np.mean(agree) > 0.97


# ----------------------------------------------------------------------------- pipelines

def _epoch(ds) -> list[bytes]:
    """One epoch's images (as bytes), in order."""
    return [x.tobytes() for images, _ in ds.as_numpy_iterator() for x in images]


def _aug_overrides(**ops) -> dict:
    return {f"augment.{k}": list(v) if isinstance(v, tuple) else v for k, v in ops.items()}


def test_train_split_only_is_augmented_and_seeded(tiny_cfg):
    plain = tiny_cfg()
    aug = config.override(plain, _aug_overrides(rotation=0.5, angles=(30.0,), deformation=1.0,
                                                deformation_alpha=300.0, deformation_sigmas=(4.0,)))
    train_plain, valid_plain = data.make_datasets(plain)
    train_aug, valid_aug = data.make_datasets(aug)
    assert _epoch(valid_aug) == _epoch(valid_plain)  # validation is never augmented
    assert train_aug.element_spec == train_plain.element_spec

    epoch1, epoch2 = _epoch(train_aug), _epoch(train_aug)
    plain1 = _epoch(train_plain)
    assert len(epoch1) == len(plain1) == 8
    assert not set(epoch1) & set(plain1)  # every sample deformed
    assert not set(epoch1) & set(epoch2)  # and drawn anew next epoch (a new random field)
    again, _ = data.make_datasets(aug)
    assert _epoch(again) == epoch1  # same seed -> same augmented first epoch
    assert _epoch(again) == epoch2  # ...and second
    other, _ = data.make_datasets(config.override(aug, {"seed": 138}))
    assert not set(_epoch(other)) & set(epoch1)
    # Training keeps one iterator for all epochs (repeat=True): its passes are the same epochs.
    repeated, valid_repeated = data.make_datasets(aug, repeat=True)
    batches = [b for b, _ in zip(repeated.as_numpy_iterator(), range(2 * len(train_aug)))]
    passes = [[img.tobytes() for img in images] for images, _ in batches]
    assert [x for p in passes[:len(train_aug)] for x in p] == epoch1
    assert [x for p in passes[len(train_aug):] for x in p] == epoch2
    assert valid_repeated.options().autotune.enabled is False  # see data.pipeline_options

    for images, targets in train_aug.take(2).as_numpy_iterator():  # labels stay 0/1 floats
        assert set(np.unique(targets).tolist()) <= {0.0, 1.0} and images.dtype == np.float32


def test_cached_pairs_are_reaugmented_every_epoch(tiny_multiclass_cfg):
    cfg = config.override(tiny_multiclass_cfg("data.cache=memory"), _aug_overrides(**FULL))
    train, _ = data.make_datasets(cfg)
    seen = []
    for _ in range(2):
        epoch = list(train.as_numpy_iterator())
        seen.append({x.tobytes() for images, _ in epoch for x in images})
        for _, targets in epoch:  # one-hot over 3 classes, exactly one class per pixel
            assert set(np.unique(targets).tolist()) <= {0.0, 1.0}
            np.testing.assert_array_equal(targets.sum(-1), 1.0)
    assert seen[0] != seen[1]


def test_training_with_augmentation(tiny_cfg):
    from seg_mlops.train import train

    cfg = config.override(tiny_cfg("train.epochs=1", "train.epoch_infer_count=0"), _aug_overrides(**FULL))
    result = train(cfg, verbose=0)
    assert len(result.history["loss"]) == 1 and np.isfinite(result.history["loss"][0])
    # the one epoch's val_dice_coef is the NumPy dice of the trained model on the (unaugmented) valid split
    assert result.history["val_dice_coef"][0] == pytest.approx(
        numpy_scores(result.model, result.cfg or cfg, "valid")["dice_coef"], rel=1e-4)


def test_real_multiclass_labels_stay_in_the_label_set():
    """Drosophila ssTEM, 5 classes: after full augmentation every pixel is still one of 0..4 and
    the class histogram stays close (geometric ops move labels, they do not invent them)."""
    root = real_data("Drosophila-VNC-ssTEM-5class")
    rgb = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]]
    cfg = config.load(None, [f"data.root={root}", "model.image_height=64", "model.image_width=64",
                             "model.num_classes=5", f"data.rgb_map={rgb}"])
    pair = data.split_pairs(cfg, "train")[0]
    image, labels = data.load_pair(pair, cfg)
    fn = augment.make_augmenter(AugmentConfig(**FULL), 64, 64)
    before = np.bincount(labels.ravel(), minlength=5) / labels.size
    for i in range(10):
        out_image, out_labels = (t.numpy() for t in fn(image, labels, tf.constant([i, 1], tf.int64)))
        assert set(np.unique(out_labels).tolist()) <= set(range(5))
        after = np.bincount(out_labels.ravel(), minlength=5) / out_labels.size
        assert np.abs(after - before).max() < 0.15


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("overrides, message", [
    (["augment.rotation=0.5", "augment.angles=[]"], "augment.angles is empty but augment.rotation=0.5"),
    (["augment.barrel_centers=[[0.5]]"], "augment.barrel_centers entry [0.5]: expected an [x, y] pair"),
    (["augment.pincushion_centers=[[0.5, 1.5]]"], "augment.pincushion_centers entry [0.5, 1.5]"),
    (["augment.shrinks=[0.8, 0]"], "augment.shrinks has 0.0: scales must be > 0"),
    (["augment.deformation_sigmas=[-1]"], "augment.deformation_sigmas has -1.0"),
    (["augment.barrel=0.5", "augment.barrel_radius=0"], "augment.barrel_radius=0.0: must be > 0"),
])
def test_config_rejects_bad_augmentation(overrides, message):
    with pytest.raises(SegMlopsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.load(None, overrides)


def test_config_accepts_empty_list_of_a_disabled_op():
    cfg = config.load(None, ["augment.angles=[]", "augment.barrel_centers=[[0.3, 0.7], [0.5, 0.5]]"])
    assert cfg.augment.angles == () and cfg.augment.barrel_centers == ((0.3, 0.7), (0.5, 0.5))
    assert dataclasses.asdict(cfg.augment)["rotation"] == 0.0
