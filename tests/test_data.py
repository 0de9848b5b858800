"""Tests for seg_mlops.data: file listing and pairing, decoding, mask encoding, resizing,
validation, fingerprints and the tf.data pipeline (dtypes, shapes, targets, seeded shuffling)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from seg_mlops import config, data, synthetic
from seg_mlops.data import Pair, encode_mask, list_images, load_pair, pair_files, read_rgb
from seg_mlops.errors import SegMlopsError

RGB3 = [[0, 0, 0], [0, 255, 0], [255, 0, 0]]  # background, green class 1, red class 2


def _png(path: Path, rgb: np.ndarray) -> Path:
    """Write an RGB (H, W, 3) or greyscale (H, W) array as PNG (cv2 wants BGR)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    assert cv2.imwrite(str(path), array)
    return path


def _touch(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")
    return folder


def _cfg(*overrides: str) -> config.Config:
    # One level: any image size is a valid model (config loading checks divisibility by 2**(levels-1)).
    return config.load(None, ["model.num_layers=1", *overrides])


def _multi_cfg(*overrides: str) -> config.Config:
    return _cfg("model.num_classes=3", f"data.rgb_map={RGB3}", *overrides)


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(SegMlopsError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------- list_images

def test_list_images_sorts_and_skips_hidden_files_and_folders(tmp_path):
    folder = _touch(tmp_path / "imgs", "b.png", "a.JPG", "c.tif", "B2.jpeg", ".hidden.png", ".DS_Store")
    (folder / "sub").mkdir()
    assert [p.name for p in list_images(folder)] == ["B2.jpeg", "a.JPG", "b.png", "c.tif"]
    assert all(p.parent == folder for p in list_images(folder))


def test_list_images_rejects_non_image_files_by_name(tmp_path):
    folder = _touch(tmp_path / "imgs", "a.png", "Thumbs.db", "notes.txt")
    msg = _error(list_images, folder)
    assert msg.startswith(f"{folder} holds non-image files: Thumbs.db, notes.txt; move them out")
    assert "a.png" not in msg


def test_list_images_empty_and_missing_folder(tmp_path):
    empty = _touch(tmp_path / "empty", ".only_hidden.png")
    assert _error(list_images, empty).startswith(f"no images in {empty} (expected .png")
    missing = tmp_path / "missing"
    assert _error(list_images, missing) == f"folder not found: {missing}"


# ----------------------------------------------------------------------------- pair_files

def test_pair_files_pairs_by_stem(tmp_path):
    images = _touch(tmp_path / "images", "b.png", "a.jpg")
    masks = _touch(tmp_path / "masks", "a.png", "b.png")
    assert pair_files(images, masks) == [Pair(images / "a.jpg", masks / "a.png"),
                                         Pair(images / "b.png", masks / "b.png")]


def test_pair_files_lists_unpaired_files_by_name(tmp_path):
    images = _touch(tmp_path / "images", "a.jpg", "b.png", "c.png", "e.png")
    masks = _touch(tmp_path / "masks", "a.png", "b.png", "d.png")
    msg = _error(pair_files, images, masks)
    assert f"2 image(s) without a mask in {masks}: c, e" in msg
    assert f"1 mask(s) without an image in {images}: d" in msg
    assert msg.endswith("(masks are paired with images by file name)")


def test_pair_files_only_missing_masks(tmp_path):
    images = _touch(tmp_path / "images", "a.png", "b.png")
    masks = _touch(tmp_path / "masks", "a.png")
    msg = _error(pair_files, images, masks)
    assert msg == (f"1 image(s) without a mask in {masks}: b (masks are paired with images by file name)")


def test_pair_files_rejects_two_images_with_one_stem(tmp_path):
    images = _touch(tmp_path / "images", "a.jpg", "a.png", "b.png")
    masks = _touch(tmp_path / "masks", "a.png", "b.png")
    assert _error(pair_files, images, masks) == f"two images share a name in {images}: a"


# ----------------------------------------------------------------------------- read_rgb

def test_read_rgb_greyscale_is_replicated(tmp_path):
    grey = np.array([[0, 50], [100, 255]], np.uint8)
    image = read_rgb(_png(tmp_path / "g.png", grey))
    assert image.shape == (2, 2, 3) and image.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], grey)


def test_read_rgb_order_is_rgb_not_bgr(tmp_path):
    bgr = np.array([[[0, 0, 255], [255, 0, 0], [0, 255, 0]]], np.uint8)  # red, blue, green in BGR
    path = tmp_path / "c.png"
    cv2.imwrite(str(path), bgr)
    np.testing.assert_array_equal(read_rgb(path), [[[255, 0, 0], [0, 0, 255], [0, 255, 0]]])


def test_read_rgb_rgba_drops_alpha_and_keeps_colour(tmp_path):
    bgra = np.array([[[0, 0, 255, 255], [0, 255, 0, 0], [255, 0, 0, 128]]], np.uint8)
    path = tmp_path / "rgba.png"
    cv2.imwrite(str(path), bgra)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape == (1, 3, 4)  # really 4 channels on disk
    # Pure red stays red; a fully transparent green pixel keeps its colour (not premultiplied).
    np.testing.assert_array_equal(read_rgb(path), [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]])


def test_read_rgb_16_bit_is_scaled(tmp_path):
    grey = np.array([[0, 65535], [257, 128 * 257]], np.uint16)
    path = tmp_path / "g16.png"
    cv2.imwrite(str(path), grey)
    image = read_rgb(path)
    assert image.dtype == np.uint8 and image.shape == (2, 2, 3)
    np.testing.assert_array_equal(image[..., 0], [[0, 255], [1, 128]])
    colour = np.array([[[65535, 0, 0]]], np.uint16)  # BGR: blue
    cv2.imwrite(str(tmp_path / "c16.png"), colour)
    np.testing.assert_array_equal(read_rgb(tmp_path / "c16.png"), [[[0, 0, 255]]])


def test_read_rgb_non_ascii_path(tmp_path):
    path = _png(tmp_path / "zellen_ü_é.png", np.full((2, 3, 3), (10, 20, 30), np.uint8))
    np.testing.assert_array_equal(read_rgb(path), np.full((2, 3, 3), (10, 20, 30), np.uint8))


def _broken_files(tmp_path: Path) -> dict[str, Path]:
    real = _png(tmp_path / "real.png", np.zeros((8, 8, 3), np.uint8)).read_bytes()
    files = {"empty": tmp_path / "empty.png", "truncated": tmp_path / "truncated.png",
             "text": tmp_path / "notes.png"}
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(real[:50])
    files["text"].write_text("these are my notes, not an image\n")
    return files


@pytest.mark.parametrize("kind", ["empty", "truncated", "text"])
def test_read_rgb_unreadable_file_names_it(tmp_path, kind):
    path = _broken_files(tmp_path)[kind]
    expected = f"cannot decode {path}: empty, truncated or not an image; replace or remove it"
    assert _error(read_rgb, path) == expected


def test_read_rgb_missing_file(tmp_path):
    path = tmp_path / "gone.png"
    assert _error(read_rgb, path) == f"cannot read {path}: No such file or directory"


# ----------------------------------------------------------------------------- encode_mask

GREY = np.array([[0, 5, 127], [128, 255, 129], [1, 0, 200]], np.uint8)


@pytest.mark.parametrize(("overrides", "expected"), [
    ((), [[0, 0, 0], [1, 1, 1], [0, 0, 1]]),  # threshold 128: >= 128 is foreground
    (("data.mask_threshold=200",), [[0, 0, 0], [0, 1, 0], [0, 0, 1]]),
    (("data.mask_threshold=5",), [[0, 1, 1], [1, 1, 1], [0, 0, 1]]),
    (("data.binary_mask=nonzero",), [[0, 1, 1], [1, 1, 1], [1, 0, 1]]),  # any non-zero pixel
])
def test_encode_binary_mask(overrides, expected):
    mask = np.repeat(GREY[..., None], 3, axis=2)
    labels = encode_mask(mask, _cfg(*overrides).data, 1)
    assert labels.dtype == np.uint8 and labels.shape == (3, 3)
    np.testing.assert_array_equal(labels, expected)


def test_encode_coloured_binary_mask_uses_brightest_channel():
    mask = np.array([[[0, 255, 0], [127, 127, 127], [0, 0, 130]],
                     [[255, 0, 0], [0, 0, 0], [0, 127, 0]]], np.uint8)
    np.testing.assert_array_equal(encode_mask(mask, _cfg().data, 1), [[1, 0, 1], [1, 0, 0]])


def test_encode_multiclass_snaps_near_colours():
    mask = np.array([[[0, 0, 0], [0, 255, 0]],
                     [[10, 245, 5], [255, 0, 0]]], np.uint8)  # (10,245,5) is 15 from green
    labels = encode_mask(mask, _multi_cfg().data, 3)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, [[0, 1], [1, 2]])
    # The tolerance is inclusive: at exactly 15 the pixel still snaps, at 14 it is an error.
    np.testing.assert_array_equal(encode_mask(mask, _multi_cfg("data.color_tolerance=15").data, 3),
                                  [[0, 1], [1, 2]])
    with pytest.raises(SegMlopsError, match=r"colour \(10, 245, 5\) \(1 px\)"):
        encode_mask(mask, _multi_cfg("data.color_tolerance=14").data, 3)


def test_encode_multiclass_far_colour_names_file_and_colour():
    mask = np.array([[[0, 0, 0], [128, 128, 0]],
                     [[128, 128, 0], [255, 0, 0]]], np.uint8)
    msg = _error(encode_mask, mask, _multi_cfg().data, 3, "masks/x.png")
    assert msg == ("masks/x.png: colour (128, 128, 0) (2 px) is farther than data.color_tolerance=60 from "
                   "every data.rgb_map colour [[0, 0, 0], [0, 255, 0], [255, 0, 0]]; "
                   "add it to rgb_map or raise the tolerance")


def test_encode_multiclass_far_colour_count_is_for_that_colour():
    mask = np.array([[[0, 0, 255], [0, 0, 255], [128, 128, 0]]], np.uint8)  # 2 blue + 1 olive, both far
    msg = _error(encode_mask, mask, _multi_cfg().data, 3, "m.png")
    assert msg.startswith("m.png: colour (0, 0, 255) (2 px)")


# ----------------------------------------------------------------------------- load_pair / resizing

def test_load_pair_size_mismatch_names_both_files(tmp_path):
    image = _png(tmp_path / "images" / "a.png", np.zeros((4, 6, 3), np.uint8))
    mask = _png(tmp_path / "masks" / "a.png", np.zeros((4, 5), np.uint8))
    msg = _error(load_pair, Pair(image, mask), _cfg())
    assert msg == f"size mismatch: image {image} is 6x4 but mask {mask} is 5x4"


def test_load_pair_far_colour_error_names_the_mask_file(tmp_path):
    image = _png(tmp_path / "images" / "a.png", np.zeros((2, 2, 3), np.uint8))
    mask = _png(tmp_path / "masks" / "a.png", np.full((2, 2, 3), (0, 0, 255), np.uint8))
    msg = _error(load_pair, Pair(image, mask), _multi_cfg())
    assert msg.startswith(f"{mask}: colour (0, 0, 255) (4 px) is farther than")


def test_load_pair_resizes_and_keeps_labels_in_label_set(tmp_path):
    # Stripes of class 0 and class 2: averaging (area/linear) would invent class 1 at the edges.
    labels = np.zeros((6, 6), np.uint8)
    labels[:, 1::2] = 2
    labels[3:, :] = 2 - labels[3:, :]
    mask = np.array(RGB3, np.uint8)[labels]
    image = np.arange(6 * 6 * 3, dtype=np.uint8).reshape(6, 6, 3)
    pair = Pair(_png(tmp_path / "i.png", image), _png(tmp_path / "m.png", mask))
    got_image, got_labels = load_pair(pair, _multi_cfg("model.image_height=4", "model.image_width=4"))
    assert got_image.shape == (4, 4, 3) and got_image.dtype == np.uint8
    assert got_labels.shape == (4, 4) and got_labels.dtype == np.uint8
    assert set(np.unique(got_labels).tolist()) == {0, 2}
    # Same size: no resizing at all, labels exactly as drawn.
    same_image, same_labels = load_pair(pair, _multi_cfg("model.image_height=6", "model.image_width=6"))
    np.testing.assert_array_equal(same_labels, labels)
    np.testing.assert_array_equal(same_image, image)


def test_load_pair_binary_resize_gives_zero_one(tmp_path):
    grey = np.where(np.indices((5, 5)).sum(0) % 2 == 0, 255, 0).astype(np.uint8)  # checkerboard
    pair = Pair(_png(tmp_path / "i.png", np.zeros((5, 5, 3), np.uint8)), _png(tmp_path / "m.png", grey))
    _, labels = load_pair(pair, _cfg("model.image_height=3", "model.image_width=3"))
    assert labels.shape == (3, 3) and set(np.unique(labels).tolist()) <= {0, 1}
    assert labels.sum() > 0


# ----------------------------------------------------------------------------- validate

def test_validate_counts_class_pixels(tmp_path):
    m1 = np.zeros((4, 4, 3), np.uint8)
    m1[0] = (0, 255, 0)  # 4 green
    m1[1, 1] = (255, 0, 0)  # 1 red -> 11 black
    m2 = np.full((4, 4, 3), (255, 0, 0), np.uint8)
    m2[3, 3] = (5, 250, 0)  # near green -> 1 green, 15 red
    pairs = []
    for name, mask in (("a", m1), ("b", m2)):
        pairs.append(Pair(_png(tmp_path / "images" / f"{name}.png", np.zeros((4, 4, 3), np.uint8)),
                          _png(tmp_path / "masks" / f"{name}.png", mask)))
    counts = data.validate(pairs, _multi_cfg("model.image_height=4", "model.image_width=4"), workers=2)
    np.testing.assert_array_equal(counts, [11, 5, 16])


def test_validate_binary_counts_and_bad_file(tmp_path):
    grey = np.array([[0, 255, 255], [0, 0, 200]], np.uint8)
    good = Pair(_png(tmp_path / "i.png", np.zeros((2, 3, 3), np.uint8)), _png(tmp_path / "m.png", grey))
    counts = data.validate([good, good], _cfg("model.image_height=2", "model.image_width=3"))
    # binary: the stored values' histogram (before any encoding), over both copies
    assert {int(v): int(counts[v]) for v in np.flatnonzero(counts)} == {0: 6, 200: 2, 255: 4}
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")
    with pytest.raises(SegMlopsError, match=f"cannot decode {broken}"):
        data.validate([good, Pair(broken, good.mask)], _cfg("model.image_height=2", "model.image_width=3"))


# ----------------------------------------------------------------------------- fingerprint

def test_fingerprint_changes_when_a_file_is_added(tmp_path):
    root = synthetic.make_dataset(tmp_path / "a", classes=1, size=16, counts=(2, 1, 1), seed=0)
    cfg = _cfg(f"data.root={root}")
    first = data.fingerprint(cfg)
    # sha256 of "<split>/<folder>/<name>:<size>" lines (image then mask, sorted), first 16 hex digits
    lines = "".join(f"{split}/{kind}/{path.name}:{path.stat().st_size}\n" for split in ("train", "valid", "test")
                    for stem in sorted(p.stem for p in (root / split / "images").iterdir())
                    for kind in ("images", "masks") for path in (root / split / kind).glob(stem + ".*"))
    assert first == hashlib.sha256(lines.encode()).hexdigest()[:16]
    assert data.fingerprint(cfg) == first
    # Same names and sizes elsewhere: same dataset version.
    copy = synthetic.make_dataset(tmp_path / "b", classes=1, size=16, counts=(2, 1, 1), seed=0)
    assert data.fingerprint(_cfg(f"data.root={copy}")) == first
    for folder in ("images", "masks"):
        (root / "train" / folder / "cell_0002.png").write_bytes(
            (root / "train" / folder / "cell_0000.png").read_bytes())
    second = data.fingerprint(cfg)
    assert second != first
    assert data.fingerprint(cfg) == second


# ----------------------------------------------------------------------------- make_dataset

@pytest.fixture(scope="module")
def six_pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("six")
    return synthetic.make_dataset(root, classes=1, size=16, counts=(6, 3, 1), seed=4)


def _means(ds) -> list[float]:
    """Per-sample image means in the order the dataset yields them (one epoch)."""
    return [round(float(x.mean()), 3) for images, _ in ds.as_numpy_iterator() for x in images]


def test_make_dataset_binary_images_and_targets(six_pairs):
    cfg = _cfg(f"data.root={six_pairs}", "model.image_height=12", "model.image_width=10")
    pairs = data.split_pairs(cfg, "valid")
    batches = list(data.make_dataset(pairs, cfg, batch_size=2, shuffle=False).as_numpy_iterator())
    assert [b[0].shape for b in batches] == [(2, 12, 10, 3), (1, 12, 10, 3)]
    assert [b[1].shape for b in batches] == [(2, 12, 10, 1), (1, 12, 10, 1)]
    images = np.concatenate([b[0] for b in batches])
    targets = np.concatenate([b[1] for b in batches])
    assert images.dtype == np.float32 and targets.dtype == np.float32
    assert images.max() > 100  # raw 0..255 pixels, not scaled to 0..1
    assert set(np.unique(targets).tolist()) == {0.0, 1.0}
    for i, pair in enumerate(pairs):  # valid keeps sorted file order, values equal load_pair's
        image, labels = load_pair(pair, cfg)
        np.testing.assert_array_equal(images[i], image.astype(np.float32))
        np.testing.assert_array_equal(targets[i, ..., 0], labels.astype(np.float32))


def test_make_dataset_multiclass_one_hot(tmp_path):
    root = synthetic.make_dataset(tmp_path, classes=3, size=16, counts=(3, 0, 0), seed=1)
    cfg = _multi_cfg(f"data.root={root}", "model.image_height=16", "model.image_width=16")
    pairs = data.split_pairs(cfg, "train")
    images, targets = next(data.make_dataset(pairs, cfg, batch_size=3, shuffle=False).as_numpy_iterator())
    assert images.shape == (3, 16, 16, 3) and targets.shape == (3, 16, 16, 3)
    assert targets.dtype == np.float32 and set(np.unique(targets).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(targets.sum(-1), np.ones((3, 16, 16), np.float32))
    for i, pair in enumerate(pairs):
        np.testing.assert_array_equal(targets[i].argmax(-1), load_pair(pair, cfg)[1])
    assert set(np.unique(targets.argmax(-1)).tolist()) == {0, 1, 2}


def test_make_dataset_shuffle_is_seeded_and_reshuffled(six_pairs):
    cfg = _cfg(f"data.root={six_pairs}", "model.image_height=16", "model.image_width=16", "seed=1")
    pairs = data.split_pairs(cfg, "train")
    in_order = _means(data.make_dataset(pairs, cfg, batch_size=4, shuffle=False))
    assert len(set(in_order)) == 6  # the means identify the samples
    assert in_order == [round(float(load_pair(p, cfg)[0].astype(np.float32).mean()), 3) for p in pairs]

    first = data.make_dataset(pairs, cfg, batch_size=4, shuffle=True)
    second = data.make_dataset(pairs, cfg, batch_size=4, shuffle=True)
    epoch1, epoch2 = _means(first), _means(first)
    assert _means(second) == epoch1  # same seed, same first-epoch order
    assert sorted(epoch1) == sorted(in_order) and sorted(epoch2) == sorted(in_order)
    assert epoch2 != epoch1  # reshuffled every epoch
    assert epoch1 != in_order
    other_seed = config.override(cfg, {"seed": 137})
    assert _means(data.make_dataset(pairs, other_seed, batch_size=4, shuffle=True)) != epoch1


@pytest.mark.parametrize("mode", ["memory", "file"])
def test_make_dataset_cache_decodes_once_and_still_reshuffles(six_pairs, tmp_path, mode):
    import shutil

    root = shutil.copytree(six_pairs, tmp_path / "copy")
    cfg = _cfg(f"data.root={root}", "model.image_height=16", "model.image_width=16", "seed=1",
               f"data.cache={mode}", f"train.output_dir={tmp_path / 'out'}")
    pairs = data.split_pairs(cfg, "train")
    streamed = _means(data.make_dataset(pairs, config.override(cfg, {"data.cache": "off"}),
                                        batch_size=4, shuffle=False))
    streamed_shuffled = _means(data.make_dataset(pairs, config.override(cfg, {"data.cache": "off"}),
                                                 batch_size=4, shuffle=True))
    ds = data.make_dataset(pairs, cfg, batch_size=4, shuffle=True)
    epoch1 = _means(ds)
    assert epoch1 == streamed_shuffled  # indices shuffled before the cache: the seed's order either way
    for path in (root / "train" / "images").iterdir():  # later epochs must not decode the files:
        path.write_bytes(b"\0" * path.stat().st_size)  # same size, no longer an image
    epoch2, epoch3 = _means(ds), _means(ds)
    assert sorted(epoch1) == sorted(epoch2) == sorted(streamed)
    assert len({tuple(epoch1), tuple(epoch2), tuple(epoch3)}) > 1  # still reshuffled per epoch
    cached = list((tmp_path / "out" / "tfdata-cache").glob("*.npy"))  # complete: no .partial.npy left
    assert len(cached) == (1 if mode == "file" else 0)
    if mode == "file":  # a new pipeline (e.g. the next run) reads the cache file, not the images
        again = _means(data.make_dataset(pairs, cfg, batch_size=4, shuffle=False))
        assert again == streamed
        other = config.override(cfg, {"model.image_height": 8, "model.image_width": 8})
        assert data.cache_file(pairs, other) != data.cache_file(pairs, cfg)  # no stale cache


def test_encode_binary_grey_equals_rgb():
    grey = np.array([[0, 127], [128, 255]], np.uint8)
    cfg = _cfg()
    rgb = np.repeat(grey[..., None], 3, axis=2)
    np.testing.assert_array_equal(encode_mask(grey, cfg.data, 1), [[0, 0], [1, 1]])
    np.testing.assert_array_equal(encode_mask(rgb, cfg.data, 1), [[0, 0], [1, 1]])


# ----------------------------------------------------------------------------- mask encodings (prepare)

def _binary_root(tmp_path: Path, scale: int, dtype=np.uint8) -> Path:
    """A synthetic binary dataset whose masks store foreground as `scale` (1 = label masks)."""
    root = synthetic.make_dataset(tmp_path / f"s{scale}", classes=1, size=16, counts=(3, 2, 2), seed=1)
    for mask in root.glob("*/masks/*.png"):
        labels = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED) > 0
        assert cv2.imwrite(str(mask), (labels * scale).astype(dtype))
    return root


@pytest.mark.parametrize(("scale", "dtype", "chosen"), [
    (255, np.uint8, "threshold"), (1, np.uint8, "nonzero"), (1, np.uint16, "nonzero"),
    (65535, np.uint16, "threshold")])
def test_prepare_auto_decides_the_encoding_and_says_so(tmp_path, capsys, scale, dtype, chosen):
    root = _binary_root(tmp_path, scale, dtype)
    reference = data.prepare(_cfg(f"data.root={_binary_root(tmp_path / 'ref', 255)}"))[1]
    cfg, profile = data.prepare(_cfg(f"data.root={root}"))
    assert cfg.data.binary_mask == chosen and profile.encoding == chosen
    stored = 1 if scale == 1 else 255  # 16-bit labels kept as stored, 65535 clipped to 255
    assert set(profile.splits["train"]["mask_values"]) == {0, stored}
    assert f"-> {chosen}" in capsys.readouterr().out
    # Whatever the encoding, the same labels: class pixels equal those of the 0/255 masks.
    for split in data.SPLITS:
        assert profile.splits[split]["class_pixels"] == reference.splits[split]["class_pixels"]
        assert profile.splits[split]["class_pixels"][1] > 0


def test_read_mask_keeps_16_bit_labels(tmp_path):
    labels = np.array([[0, 1], [2, 300]], np.uint16)
    path = tmp_path / "m.png"
    assert cv2.imwrite(str(path), labels)
    # The old reader divided by 257: labels 1 and 2 became 0.
    np.testing.assert_array_equal(data.read_mask(path, 1), [[0, 1], [2, 255]])


def test_prepare_refuses_a_split_without_foreground(tmp_path):
    root = _binary_root(tmp_path, 1)
    message = _error(data.prepare, _cfg(f"data.root={root}", "data.binary_mask=threshold"))
    assert message.startswith(f"no foreground in the train split ({root / 'train' / 'masks'})")
    assert "{0, 1}" in message and "data.binary_mask: auto" in message


def test_prepare_warns_about_a_class_absent_from_train(tmp_path, capsys):
    root = synthetic.make_dataset(tmp_path / "m", classes=3, size=16, counts=(2, 1, 1), seed=1)
    for mask in (root / "train" / "masks").glob("*.png"):  # class 2 (red) painted as class 1
        bgr = cv2.imread(str(mask))
        bgr[(bgr == (0, 0, 255)).all(-1)] = (0, 255, 0)
        cv2.imwrite(str(mask), bgr)
    cfg = _cfg(f"data.root={root}", "model.num_classes=3", f"data.rgb_map={synthetic.rgb_map(3)}")
    _, profile = data.prepare(cfg)
    assert profile.splits["train"]["class_pixels"][2] == 0
    assert f"warning: class 2 (colour {list(synthetic.rgb_map(3)[2])} of data.rgb_map) is absent from the train split" \
        in capsys.readouterr().out


# ----------------------------------------------------------------------------- valid_fraction

def test_valid_fraction_carves_whole_groups_seeded(tmp_path):
    root = tmp_path / "d"
    stems = [f"{prefix}cell{i}" for i in range(6) for prefix in ("", "flipped_", "rotated_90_")]
    for stem in stems:
        _png(root / "train" / "images" / f"{stem}.png", np.zeros((4, 4, 3), np.uint8))
        _png(root / "train" / "masks" / f"{stem}.png", np.full((4, 4), 255, np.uint8))
    group = r"(?:flipped_|rotated_\d+_)?(.+)"
    cfg = _cfg(f"data.root={root}", "data.valid_fraction=0.3", f"data.valid_group={group}")
    train, valid = data.split_pairs(cfg, "train"), data.split_pairs(cfg, "valid")
    cells = lambda pairs: {data.group_of(p.image.stem, group) for p in pairs}  # noqa: E731
    assert len(valid) == 6 and len(train) == 12  # ceil(0.3 * 18) = 6: two whole cells of three
    assert not cells(train) & cells(valid) and len(cells(valid)) == 2
    assert data.split_pairs(cfg, "valid") == valid  # seeded: the same carve every time
    other = data.split_pairs(config.override(cfg, {"seed": 1}), "valid")
    assert cells(other) != cells(valid)
    # Without a group pattern every file is its own group.
    loose = data.split_pairs(config.override(cfg, {"data.valid_group": ""}), "valid")
    assert len(loose) == 6 and len(cells(loose)) > 2


def test_valid_fraction_errors(tmp_path):
    root = synthetic.make_dataset(tmp_path / "d", classes=1, size=16, counts=(3, 1, 1), seed=1)
    message = _error(data.split_pairs, _cfg(f"data.root={root}", "data.valid_fraction=0.2"), "valid")
    assert "data.valid_fraction=0.2" in message and str(root / "valid" / "images") in message
    import shutil
    shutil.rmtree(root / "valid")
    message = _error(data.split_pairs, _cfg(f"data.root={root}"), "valid")
    assert message == (f"no validation split: {root / 'valid' / 'images'} not found; add it, or set "
                       "data.valid_fraction: 0.2 to carve one out of train")
    message = _error(data.split_pairs, _cfg(f"data.root={root}", "data.valid_fraction=0.9"), "valid")
    assert "leaves no training data" in message
