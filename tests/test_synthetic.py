"""Tests of the synthetic demo dataset: shapes, mask values, learnability, file layout, determinism."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from seg_mlops.synthetic import PALETTE, make_dataset, make_pair, rgb_map


def _labels(mask: np.ndarray, classes: int) -> np.ndarray:
    """Class index per pixel of an RGB mask; -1 where the colour is not one of the first `classes`."""
    palette = np.array(PALETTE[:classes], np.uint8)
    hits = (mask[..., None, :] == palette).all(-1)
    return np.where(hits.any(-1), hits.argmax(-1), -1)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.mark.parametrize(("classes", "mask_shape"), [(1, (48, 48)), (3, (48, 48, 3))])
def test_make_pair_shapes_and_dtypes(classes, mask_shape):
    image, mask = make_pair(np.random.default_rng(0), size=48, classes=classes)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert mask.shape == mask_shape and mask.dtype == np.uint8


def test_binary_mask_values_and_foreground_fraction():
    rng = np.random.default_rng(1)
    fractions = []
    for _ in range(8):
        _, mask = make_pair(rng, size=64, classes=1)
        assert set(np.unique(mask)) <= {0, 255}
        fractions.append((mask == 255).mean())
    assert 0.05 < np.mean(fractions) < 0.70
    assert max(fractions) < 0.95  # never an all-foreground image


@pytest.mark.parametrize("classes", [2, 3, 4, 5])
def test_multiclass_mask_uses_palette_and_every_class(classes):
    rng = np.random.default_rng(2)
    seen = set()
    for _ in range(8):
        _, mask = make_pair(rng, size=64, classes=classes)
        labels = _labels(mask, classes)
        assert (labels >= 0).all(), "a mask pixel is not one of the palette colours"
        seen |= set(np.unique(labels).tolist())
    assert seen == set(range(classes))


def test_nuclei_are_darker_than_background():
    rng = np.random.default_rng(3)
    nucleus, background = [], []
    for _ in range(6):
        image, mask = make_pair(rng, size=64, classes=3)
        grey = image.astype(float).mean(-1)
        labels = _labels(mask, 3)
        nucleus.append(grey[labels == 2].mean())
        background.append(grey[labels == 0].mean())
    # A clear gap (well above the pixel noise) is what makes the data learnable.
    assert np.mean(background) - np.mean(nucleus) > 40


def test_make_dataset_layout_and_readback(tmp_path):
    root = make_dataset(tmp_path / "data", classes=1, size=32, counts=(3, 2, 1), seed=0)
    assert root == tmp_path / "data"
    for split, count in zip(("train", "valid", "test"), (3, 2, 1)):
        images = sorted(p.name for p in (root / split / "images").iterdir())
        masks = sorted(p.name for p in (root / split / "masks").iterdir())
        assert len(images) == count and images == masks
        assert all(n.startswith("cell_") and n.endswith(".png") for n in images)

    # The first training pair is the first draw of the train split's generator.
    image, mask = make_pair(np.random.default_rng([0, 0]), size=32, classes=1)
    read_image = cv2.imread(str(root / "train/images/cell_0000.png"), cv2.IMREAD_UNCHANGED)
    read_mask = cv2.imread(str(root / "train/masks/cell_0000.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(cv2.cvtColor(read_image, cv2.COLOR_BGR2RGB), image)
    assert read_mask.ndim == 2  # greyscale PNG
    np.testing.assert_array_equal(read_mask, mask)


def test_multiclass_masks_are_rgb_pngs(tmp_path):
    root = make_dataset(tmp_path, classes=3, size=32, counts=(2, 0, 0), seed=5)
    assert list((root / "valid" / "images").iterdir()) == []
    for path in (root / "train" / "masks").iterdir():
        mask = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
        assert (_labels(mask, 3) >= 0).all()
    # RGB order on disk: the nucleus colour (255, 0, 0) must read back as red, not blue.
    _, expected = make_pair(np.random.default_rng([5, 0]), size=32, classes=3)
    got = cv2.cvtColor(cv2.imread(str(root / "train/masks/cell_0000.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(got, expected)


def test_make_dataset_is_deterministic(tmp_path):
    kwargs = dict(classes=5, size=32, counts=(2, 1, 1))
    first = _files(make_dataset(tmp_path / "a", seed=7, **kwargs))
    second = _files(make_dataset(tmp_path / "b", seed=7, **kwargs))
    other = _files(make_dataset(tmp_path / "c", seed=8, **kwargs))
    assert len(first) == 8 and first == second
    assert first.keys() == other.keys() and first != other


@pytest.mark.parametrize(
    "kwargs",
    [dict(classes=0), dict(classes=6), dict(size=15), dict(counts=(1, -1, 0)), dict(counts=(1, 1))],
)
def test_make_dataset_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_dataset(tmp_path, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(classes=0), dict(classes=6), dict(size=8)])
def test_make_pair_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_pair(np.random.default_rng(0), **kwargs)


def test_rgb_map():
    assert rgb_map(3) == [[0, 0, 0], [0, 255, 0], [255, 0, 0]]
    assert rgb_map(5) == [list(c) for c in PALETTE]
    with pytest.raises(ValueError):
        rgb_map(1)
