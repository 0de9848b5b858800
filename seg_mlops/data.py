"""Image/mask pairs: find, validate, decode, encode masks as labels, and stream them with tf.data.

Images are RGB everywhere (greyscale, RGBA and 16-bit inputs are converted on read, so training,
evaluation and inference see the same pixels; the reference fed BGR to training and RGB to
inference). Masks become class-index label maps *before* resizing, and label maps are resized with
nearest neighbour, so labels stay labels. Unless data.cache asks to keep the decoded pairs
(seg_mlops.pair_cache), nothing loads a whole split into memory: tf.data decodes files in
parallel, one batch at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from seg_mlops import augment as augment_mod
from seg_mlops import pair_cache
from seg_mlops.config import Config, DataConfig
from seg_mlops.errors import SegMlopsError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLITS = ("train", "valid", "test")
INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR,
                 "cubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path


# ----------------------------------------------------------------------------- files

def list_images(folder: str | Path) -> list[Path]:
    """Image files of `folder`, sorted by name. Hidden files are skipped; any other non-image
    file (Thumbs.db, notes.txt) is an error, because a silently ignored file is usually a mistake."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SegMlopsError(f"folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    other = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if other:
        raise SegMlopsError(f"{folder} holds non-image files: {_names(other)}; move them out "
                            f"(images must be {' '.join(IMAGE_SUFFIXES)})")
    if not files:
        raise SegMlopsError(f"no images in {folder} (expected {' '.join(IMAGE_SUFFIXES)} files)")
    return files


def pair_files(images_dir: str | Path, masks_dir: str | Path) -> list[Pair]:
    """Pair images with masks by file stem (a.jpg <-> a.png), sorted by stem."""
    images = {p.stem: p for p in list_images(images_dir)}
    masks = {p.stem: p for p in list_images(masks_dir)}
    for kind, found in (("image", images), ("mask", masks)):
        files = list_images(images_dir if kind == "image" else masks_dir)
        if len(found) != len(files):
            dup = sorted({p.stem for p in files if sum(q.stem == p.stem for q in files) > 1})
            raise SegMlopsError(f"two {kind}s share a name in {files[0].parent}: {_names(dup)}")
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if no_mask or no_image:
        parts = []
        if no_mask:
            parts.append(f"{len(no_mask)} image(s) without a mask in {masks_dir}: {_names(no_mask)}")
        if no_image:
            parts.append(f"{len(no_image)} mask(s) without an image in {images_dir}: {_names(no_image)}")
        raise SegMlopsError("; ".join(parts) + " (masks are paired with images by file name)")
    return [Pair(images[s], masks[s]) for s in sorted(images)]


def split_pairs(cfg: Config, split: str) -> list[Pair]:
    """The pairs of `split`. Without a valid folder and with data.valid_fraction > 0, "valid" is a
    seeded share of the train folder (whole groups, see data.valid_group) and "train" the rest.
    With data.folds, "valid" is fold data.fold of the pooled train and valid folders and "train"
    the other folds (see `assign_folds`)."""
    if cfg.data.folds and split in ("train", "valid"):
        return fold_pairs(cfg, split)
    if cfg.data.valid_fraction and split in ("train", "valid"):
        valid_images, _ = cfg.split_dirs("valid")
        if cfg.data.valid_images or valid_images.is_dir():
            raise SegMlopsError(f"data.valid_fraction={cfg.data.valid_fraction:g} carves validation out of "
                                f"train, but a valid folder is given ({valid_images}): use one of the two")
        train, valid = carve(pair_files(*cfg.split_dirs("train")), cfg.data.valid_fraction,
                             cfg.data.valid_group, cfg.seed)
        return train if split == "train" else valid
    images_dir, masks_dir = cfg.split_dirs(split)
    if split == "valid" and not images_dir.is_dir() and not cfg.data.valid_images:
        raise SegMlopsError(f"no validation split: {images_dir} not found; add it, or set "
                            "data.valid_fraction: 0.2 to carve one out of train")
    return pair_files(images_dir, masks_dir)


def folder_pairs(cfg: Config, split: str) -> list[Pair]:
    """The pairs the split's folders hold; [] for a valid folder that does not exist (k-fold
    cross-validation then pools train alone)."""
    images_dir, masks_dir = cfg.split_dirs(split)
    if split == "valid" and not images_dir.is_dir() and not cfg.data.valid_images:
        return []
    return pair_files(images_dir, masks_dir)


def pooled_pairs(cfg: Config) -> list[Pair]:
    """What k-fold cross-validation splits into folds: the train folder's pairs, then the valid
    folder's. The test split is never pooled: it stays for the final, unbiased evaluation."""
    return folder_pairs(cfg, "train") + folder_pairs(cfg, "valid")


def fold_pairs(cfg: Config, split: str) -> list[Pair]:
    """Fold data.fold of the pooled pairs ("valid"), or every other fold ("train")."""
    if cfg.data.fold < 0:
        raise SegMlopsError(f"data.folds={cfg.data.folds} with data.fold=-1 trains every fold, one run each: "
                            "run it with seg-mlops train (seg_mlops.crossval), or set data.fold to one fold")
    pairs = pooled_pairs(cfg)
    folds = assign_folds([p.image.stem for p in pairs], cfg.data.folds, cfg.data.valid_group, cfg.seed)
    return [p for p, f in zip(pairs, folds) if (f == cfg.data.fold) == (split == "valid")]


def assign_folds(stems: Sequence[str], k: int, pattern: str, seed: int) -> list[int]:
    """The fold (0..k-1) of each file stem: whole groups (`group_of(stem, pattern)`), so no group
    is in two folds. The group names are sorted, shuffled with `seed`, then placed largest first
    (a stable sort keeps the shuffled order among equal sizes) into the fold holding the fewest
    files so far (the lowest index on a tie): fold sizes differ by at most the largest group.
    Depends only on the stems as a set, k, pattern and seed, not on their order."""
    if k < 2:
        raise SegMlopsError(f"data.folds={k}: cross-validation needs at least 2 folds")
    groups: dict[str, int] = {}
    for group in (group_of(stem, pattern) for stem in stems):
        groups[group] = groups.get(group, 0) + 1
    if len(groups) < k:
        raise SegMlopsError(f"data.folds={k} needs at least {k} groups, but the {len(stems)} pooled train+valid "
                            f"files form {len(groups)} (data.valid_group={pattern!r}); use fewer folds or add data")
    order = sorted(groups)
    np.random.default_rng(seed).shuffle(order)
    order.sort(key=lambda g: -groups[g])
    sizes, fold_of = [0] * k, {}
    for group in order:
        fold_of[group] = sizes.index(min(sizes))
        sizes[fold_of[group]] += groups[group]
    return [fold_of[group_of(stem, pattern)] for stem in stems]


def group_of(stem: str, pattern: str) -> str:
    """The group a file belongs to: the first group of `pattern` matched in the stem (or the whole
    match), or the stem itself when the pattern is "" or does not match."""
    found = re.search(pattern, stem) if pattern else None
    if not found:
        return stem
    return found.group(1) if found.re.groups else found.group(0)


def carve(pairs: Sequence[Pair], fraction: float, pattern: str, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, valid): whole groups drawn in a seeded order until valid holds at least `fraction`
    of the pairs, so augmented copies of one object never straddle the two splits."""
    groups: dict[str, list[Pair]] = {}
    for pair in pairs:
        groups.setdefault(group_of(pair.image.stem, pattern), []).append(pair)
    order = sorted(groups)
    np.random.default_rng(seed).shuffle(order)
    wanted, valid_keys = math.ceil(fraction * len(pairs)), set()
    for key in order:
        if sum(len(groups[k]) for k in valid_keys) >= wanted:
            break
        valid_keys.add(key)
    if len(valid_keys) == len(groups):
        raise SegMlopsError(f"data.valid_fraction={fraction:g} leaves no training data: {len(pairs)} pairs in "
                            f"{len(groups)} group(s) (data.valid_group={pattern!r}); lower it or add data")
    train = [p for p in pairs if group_of(p.image.stem, pattern) not in valid_keys]
    valid = [p for p in pairs if group_of(p.image.stem, pattern) in valid_keys]
    return train, valid


def _names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def fingerprint(cfg: Config, splits: Sequence[str] = SPLITS) -> str:
    """Hash of the sorted file names and sizes of every split (or of `splits`): identifies the
    dataset version (one split's version with one split). With data.folds, the whole dataset is
    hashed as its folders hold it: every fold run, the cross-validation and a plain run on the same
    folders share one fingerprint (which fold validates is config, in the params)."""
    digest = hashlib.sha256()
    whole = cfg.data.folds and {"train", "valid"} <= set(splits)
    for split in splits:
        for pair in folder_pairs(cfg, split) if whole else split_pairs(cfg, split):
            for path in (pair.image, pair.mask):
                digest.update(f"{split}/{path.parent.name}/{path.name}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- decoding

def decode_file(path: str | Path, labels: bool = False) -> np.ndarray:
    """Decode any supported file to uint8: (H, W) grey, or BGR / BGRA channels.

    Images (labels=False): 16-bit and float intensities are scaled to 0..255. Masks (labels=True)
    hold labels, never intensities: values are kept as stored (a 16-bit label 1 stays 1; the
    reference's /257 made it 0), and only values above 255 are clipped to 255 (a 0/65535 mask
    reads as 0/255).
    """
    path = Path(path)
    try:
        buffer = np.fromfile(path, dtype=np.uint8)  # np.fromfile + imdecode: non-ASCII paths work
    except OSError as exc:
        raise SegMlopsError(f"cannot read {path}: {exc.strerror}") from None
    return decode_bytes(buffer, path, labels, "; replace or remove it")


def decode_bytes(buffer: bytes | np.ndarray, name: object = "image", labels: bool = False,
                 hint: str = "") -> np.ndarray:
    """`decode_file` for the bytes of an encoded file (PNG, JPEG, TIFF, BMP...); `name` and `hint`
    go into the error for data that is no image."""
    buffer = np.frombuffer(buffer, dtype=np.uint8) if isinstance(buffer, (bytes, bytearray)) else buffer
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED) if buffer.size else None
    if image is None:
        raise SegMlopsError(f"cannot decode {name}: empty, truncated or not an image{hint}")
    if image.dtype == np.uint8:
        return image
    if labels:
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if image.dtype == np.uint16:
        return (image // 257).astype(np.uint8)
    return cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def encode_file(image: np.ndarray, suffix: str = ".png") -> bytes:
    """uint8 (H, W) grey or (H, W, 3) BGR channels as a file's bytes, as stored: the counterpart
    of decode_file. The format follows the suffix (.png, .jpg, ...)."""
    ok, buffer = cv2.imencode(suffix, image)
    if not ok:
        raise SegMlopsError(f"cannot encode a {image.shape} {image.dtype} image as {suffix}")
    return buffer.tobytes()


def encode_rgb(image: np.ndarray, suffix: str = ".png") -> bytes:
    """A uint8 RGB (H, W, 3) image (panels, colour masks, overlays) as a file's bytes."""
    return encode_file(cv2.cvtColor(np.asarray(image, np.uint8), cv2.COLOR_RGB2BGR), suffix)


def encode_palette(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> bytes:
    """Class ids as a palette PNG (pixel value = class id, colours = palette): viewers show the
    colours, readers get the ids. OpenCV cannot write palette PNGs, hence Pillow here only."""
    import io

    from PIL import Image

    image = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
    image.putpalette([c for colour in palette for c in colour])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_bytes(path: str | Path, content: bytes) -> None:
    """Write encoded bytes to `path`; a failure names the file."""
    try:
        Path(path).write_bytes(content)
    except OSError as exc:
        raise SegMlopsError(f"cannot write {path}: {exc.strerror}") from None


def write_file(path: str | Path, image: np.ndarray) -> None:
    """Write uint8 grey or BGR channels as stored (format from the suffix); see encode_file."""
    write_bytes(path, encode_file(image, Path(path).suffix or ".png"))


def write_rgb(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 RGB (H, W, 3) image (panels, colour masks, overlays, spooled images)."""
    write_bytes(path, encode_rgb(image, Path(path).suffix or ".png"))


def read_rgb(path: str | Path) -> np.ndarray:
    """Read any supported image as uint8 RGB (H, W, 3).

    Greyscale is replicated, alpha dropped, 16-bit scaled to 8-bit; unreadable files raise
    a SegMlopsError naming the file.
    """
    return to_rgb(decode_file(path))


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Decoded grey, BGR or BGRA uint8 -> RGB (H, W, 3)."""
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path, num_classes: int) -> np.ndarray:
    """A mask as encode_mask wants it: binary masks as read (grey stays one channel, which is
    ~8x cheaper than expanding it to RGB), multiclass masks as RGB."""
    mask = decode_file(path, labels=True)
    if num_classes > 1:
        return to_rgb(mask)
    return mask if mask.ndim == 2 else mask[..., :3]


def encode_mask(mask: np.ndarray, data: DataConfig, num_classes: int, name: str = "mask") -> np.ndarray:
    """Mask (H, W, 3) RGB, or (H, W) grey for binary -> uint8 class indices (H, W).

    Binary: foreground where the brightest channel reaches data.mask_threshold (so green or red
    masks work too), or any non-zero pixel with binary_mask="nonzero". "auto" is decided once per
    dataset by `prepare`; a mask encoded on its own with "auto" decides for itself (values all 0
    or 1: labels). Multiclass: nearest colour of data.rgb_map; a pixel farther than
    data.color_tolerance from every colour is an error.
    """
    if num_classes == 1:
        value = brightest(mask)
        nonzero = data.binary_mask == "nonzero" or (data.binary_mask == "auto" and value.max() <= 1)
        return (value > 0 if nonzero else value >= data.mask_threshold).astype(np.uint8)
    colours = np.asarray(data.rgb_map, dtype=np.float32)  # (K, 3)
    # Squared distance of each pixel to each class colour, computed on the unique colours only:
    # masks hold few distinct colours. Colours are packed into one integer first: a 1-D unique
    # is ~7x faster than np.unique(axis=0) on rows (1.3 s -> 0.2 s for a 512 px RGB mask).
    flat = mask.reshape(-1, 3).astype(np.uint32)
    packed, inverse = np.unique((flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2], return_inverse=True)
    unique = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=1).astype(np.uint8)
    dist = ((unique[:, None, :].astype(np.float32) - colours[None]) ** 2).sum(axis=2)
    nearest = dist.argmin(axis=1)
    far = np.sqrt(dist.min(axis=1)) > data.color_tolerance
    if far.any():
        bad = unique[far][0]
        count = int((inverse.ravel() == np.flatnonzero(far)[0]).sum())
        raise SegMlopsError(
            f"{name}: colour {tuple(int(c) for c in bad)} ({count} px) is farther than "
            f"data.color_tolerance={data.color_tolerance:g} from every data.rgb_map colour "
            f"{[list(c) for c in data.rgb_map]}; add it to rgb_map or raise the tolerance")
    return nearest[inverse.ravel()].reshape(mask.shape[:2]).astype(np.uint8)


def brightest(mask: np.ndarray) -> np.ndarray:
    """The brightest channel of a binary mask (channel order does not matter; np.maximum on
    channel views is ~10x faster than mask.max(axis=2))."""
    if mask.ndim == 2:
        return mask
    return np.maximum(np.maximum(mask[..., 0], mask[..., 1]), mask[..., 2])


def check_same_size(image: np.ndarray, mask: np.ndarray, pair: Pair) -> None:
    """An image and its mask must have the same height and width."""
    if image.shape[:2] != mask.shape[:2]:
        raise SegMlopsError(f"size mismatch: image {pair.image} is {image.shape[1]}x{image.shape[0]} "
                            f"but mask {pair.mask} is {mask.shape[1]}x{mask.shape[0]}")


def resize_image(image: np.ndarray, size: tuple[int, int], interpolation: str = "area") -> np.ndarray:
    """Resize an (H, W, C) image to size=(height, width)."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=INTERPOLATION[interpolation])


def load_pair(pair: Pair, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Decode, check and resize one pair: uint8 image (h, w, 3) and uint8 labels (h, w)."""
    image = read_rgb(pair.image)
    mask = read_mask(pair.mask, cfg.model.num_classes)
    check_same_size(image, mask, pair)
    labels = encode_mask(mask, cfg.data, cfg.model.num_classes, str(pair.mask))
    size = (cfg.model.image_height, cfg.model.image_width)
    image = resize_image(image, size, cfg.data.image_interpolation)
    labels = resize_image(labels, size, "nearest")
    return image, labels


def validate(pairs: Sequence[Pair], cfg: Config, workers: int = 4) -> np.ndarray:
    """Decode every pair once before training, so a bad file fails now with its name, not
    mid-epoch inside TensorFlow. Returns the masks' histogram at their stored size: for binary
    masks the pixel count of each stored value 0..255 (brightest channel, before any encoding),
    for multiclass the pixel count of each class."""
    classes = cfg.model.num_classes

    def histogram(pair: Pair) -> np.ndarray:
        image, mask = read_rgb(pair.image), read_mask(pair.mask, classes)
        check_same_size(image, mask, pair)
        if classes == 1:
            return np.bincount(brightest(mask).ravel(), minlength=256)
        return np.bincount(encode_mask(mask, cfg.data, classes, str(pair.mask)).ravel(), minlength=classes)

    with ThreadPoolExecutor(workers) as pool:  # cv2 releases the GIL while decoding
        return np.sum(list(pool.map(histogram, pairs)), axis=0)


@dataclass(frozen=True)
class Profile:
    """What the validation pass saw: per split, the number of pairs, the stored mask values
    (binary) and the pixel count of each class under the chosen encoding."""

    encoding: str  # binary: "nonzero" or "threshold" (as data.binary_mask); multiclass: "rgb_map"
    splits: dict
    shape: dict = dataclasses.field(default_factory=dict)  # the train split's sizes and objects (dataset_profile)

    def to_json(self) -> str:
        return json.dumps({"mask_encoding": self.encoding, "splits": self.splits, **self.shape}, indent=2)


def prepare(cfg: Config, splits: Sequence[str] = SPLITS) -> tuple[Config, Profile]:
    """Validate every pair of `splits`, decide how binary masks encode labels, and check that
    every split has foreground. Returns the config with data.binary_mask decided (never "auto")
    and the profile (logged as dataset_profile.json)."""
    pairs = {split: split_pairs(cfg, split) for split in splits}
    histograms = {split: validate(found, cfg) for split, found in pairs.items()}
    cfg, how = decide_encoding(cfg, histograms)
    report = {}
    for split, hist in histograms.items():
        pixels = class_pixels(hist, cfg)
        report[split] = {"images": len(pairs[split]), "class_pixels": pixels.tolist(),
                         "class_fractions": [round(float(p) / max(pixels.sum(), 1), 6) for p in pixels]}
        if cfg.model.num_classes == 1:
            report[split]["mask_values"] = {int(v): int(hist[v]) for v in np.flatnonzero(hist)}
        check_foreground(cfg, split, hist, pixels)
    warn_absent_classes(cfg, report)
    print(how)
    encoding = cfg.data.binary_mask if cfg.model.num_classes == 1 else "rgb_map"
    return cfg, Profile(encoding, report)


def decide_encoding(cfg: Config, histograms: dict[str, np.ndarray]) -> tuple[Config, str]:
    """data.binary_mask "auto" -> "nonzero" when every stored mask value is 0 or 1 (label masks),
    else "threshold"; returns the config and the line that says what was chosen and why."""
    if cfg.model.num_classes > 1:
        return cfg, f"masks: colours snapped to data.rgb_map ({cfg.model.num_classes} classes)"
    seen = _values(np.sum(list(histograms.values()), axis=0))
    mode = cfg.data.binary_mask
    if mode == "auto":
        top = max(np.flatnonzero(np.sum(list(histograms.values()), axis=0)), default=0)
        mode = "nonzero" if top <= 1 else "threshold"
    rule = "any non-zero value is foreground (labels)" if mode == "nonzero" else \
        f"foreground where the value >= data.mask_threshold={cfg.data.mask_threshold}"
    line = f"masks: stored values {seen}; data.binary_mask={cfg.data.binary_mask} -> {mode}: {rule}"
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, binary_mask=mode)), line


def class_pixels(hist: np.ndarray, cfg: Config) -> np.ndarray:
    """Pixels of each class (background first) from a validate() histogram, under cfg's encoding."""
    if cfg.model.num_classes > 1:
        return hist
    first = 1 if cfg.data.binary_mask == "nonzero" else cfg.data.mask_threshold
    return np.array([hist[:first].sum(), hist[first:].sum()])


def check_foreground(cfg: Config, split: str, hist: np.ndarray, pixels: np.ndarray) -> None:
    """A split whose masks hold no foreground pixel makes every dice meaningless (a model that
    predicts nothing would score perfectly): an error naming the split and what to change."""
    if pixels[1:].sum() > 0:
        return
    folder = cfg.split_dirs(split)[1]
    if cfg.model.num_classes == 1:
        raise SegMlopsError(
            f"no foreground in the {split} split ({folder}): its masks hold the values {_values(hist)} and "
            f"data.binary_mask={cfg.data.binary_mask} with data.mask_threshold={cfg.data.mask_threshold} makes "
            "every pixel background; set data.binary_mask: auto (0/1 masks are labels) or lower data.mask_threshold")
    raise SegMlopsError(
        f"no foreground in the {split} split ({folder}): every mask pixel is the background colour "
        f"{list(cfg.data.rgb_map[0])} (data.rgb_map[0]); check the masks and data.rgb_map")


def warn_absent_classes(cfg: Config, report: dict) -> None:
    """A class of rgb_map that train never shows cannot be learned: say so (and which)."""
    if cfg.model.num_classes == 1 or "train" not in report:
        return
    for index, count in enumerate(report["train"]["class_pixels"]):
        if count == 0:
            print(f"warning: class {index} (colour {list(cfg.data.rgb_map[index])} of data.rgb_map) is absent from "
                  "the train split: the model cannot learn it, and its dice is skipped where its truth is empty")


def _values(hist: np.ndarray) -> str:
    """Stored mask values seen, e.g. "{0, 1}" or "0..255 (37 distinct)"."""
    found = np.flatnonzero(hist)
    if len(found) <= 8:
        return "{" + ", ".join(str(v) for v in found) + "}"
    return f"{found.min()}..{found.max()} ({len(found)} distinct)"


# ----------------------------------------------------------------------------- tf.data

def make_dataset(pairs: Sequence[Pair], cfg: Config, *, batch_size: int, shuffle: bool,
                 augment: bool = False, repeat: bool = False):
    """A tf.data pipeline of (float32 raw-pixel images, float32 binary/one-hot labels).

    The pairs' indices are shuffled (seeded, reshuffled every epoch), then each pair is fetched:
    decoded from its files in parallel, or, with data.cache "memory" or "file", taken from the
    store the first pass filled (seg_mlops.pair_cache: N x H x W x 4 bytes, in memory or in a
    memory-mapped file under the output folder). Shuffling indices before fetching covers the
    whole split at no memory cost, the first batch waits only for its own pairs, and a seed gives
    the same order with or without a cache.

    With augment=True (the train split only) and any cfg.augment probability above 0, every
    decoded uint8 pair is augmented after the cache and the shuffle, so cached pairs are drawn
    anew every epoch (seg_mlops.augment); validation, test and inference pipelines never are.

    With repeat=True the batches of one pass repeat forever (each pass reshuffled, its last batch
    still partial): training keeps ONE iterator for all epochs (fit with `steps_per_epoch`, see
    `steps`). For a finite dataset Keras makes a new iterator every epoch, and dropping the old one
    blocks the main thread until its background threads stop: tf.data's autotuning thread
    (RootDataset's) finishes its current pass first, which stalled the start of epochs by seconds
    to tens of seconds on busy CPUs (issue 17: py-spy showed the main thread in
    ~IteratorResource -> ~LogicalThreadWrapper; bench/overhead.py prints the waits).
    """
    import tensorflow as tf

    height, width = cfg.model.image_height, cfg.model.image_width
    num_classes = cfg.model.num_classes
    pairs = list(pairs)
    store = pair_cache.make_store(cfg.data.cache, cache_file(pairs, cfg), len(pairs), height, width,
                                  lambda i: load_pair(pairs[i], cfg))
    ds = tf.data.Dataset.range(len(pairs))
    if shuffle:
        ds = ds.shuffle(max(len(pairs), 1), seed=cfg.seed, reshuffle_each_iteration=True)

    def load(index: np.int64) -> tuple[np.ndarray, np.ndarray]:
        return store.get(int(index)) if store is not None else load_pair(pairs[int(index)], cfg)

    def fetch(index):
        image, labels = tf.numpy_function(load, [index], [tf.uint8, tf.uint8])
        return tf.ensure_shape(image, (height, width, 3)), tf.ensure_shape(labels, (height, width))

    def to_float(image, labels):
        if num_classes == 1:
            target = tf.cast(labels, tf.float32)[..., None]
        else:
            target = tf.one_hot(labels, num_classes, dtype=tf.float32)
        return tf.cast(image, tf.float32), target

    parallel = pipeline_threads(cfg)  # fixed: tf.data's autotuner is off (see pipeline_options)
    ds = ds.map(fetch, num_parallel_calls=parallel, deterministic=True)
    if augment and augment_mod.enabled(cfg.augment):
        ds = augment_mod.augment_dataset(ds, cfg.augment, cfg.seed, height, width)
    ds = ds.map(to_float, num_parallel_calls=parallel).batch(batch_size)
    if repeat:
        ds = ds.repeat()
    return ds.prefetch(PREFETCH_BATCHES).with_options(pipeline_options(cfg))


def steps(pairs: Sequence[Pair], batch_size: int) -> int:
    """Batches in one pass over `pairs` (the last one partial): an epoch of a repeated pipeline."""
    return math.ceil(len(pairs) / batch_size)


PREFETCH_BATCHES = 2  # batches made ahead of the model: one being consumed, one ready


def pipeline_threads(cfg: Config) -> int:
    """Pairs decoded (and augmented) in parallel: train.threads, else every core."""
    return cfg.train.threads or os.cpu_count() or 1


def pipeline_options(cfg: Config):
    """tf.data options: sharding for several workers, and the pipeline's threads.

    Shard by DATA for a multi-worker run (every worker runs the same seeded pipeline and keeps its
    share of each global batch). TensorFlow's AUTO policy would try FILE sharding first, which
    only applies to datasets read by file-reader ops (TFRecord...); ours decodes files in a
    numpy_function, so AUTO would fall back to DATA with a warning. Explicit is quieter and says
    what happens. With one worker (none, mirrored) it changes nothing.

    With train.threads = n > 0 the pipeline runs on a private pool of n threads (tf.data's own
    option), so that it, like the model's n intra-op threads, stays within the n cores it was
    given; 0 keeps tf.data's default pool (as large as the machine).

    tf.data's autotuner is off: its thread (one per iterator) must finish its current pass before
    the iterator can be dropped, and Keras drops the validation iterator after every evaluation
    (`evaluate` resets it) and, for finite data, the training iterator every epoch. On 2 busy
    cores that wait took up to ~10 s per epoch (bench/overhead.py; issue 17). The pipeline keeps
    fixed parallelism instead (`pipeline_threads`, PREFETCH_BATCHES), which keeps ahead of the model
    (bench/README.md).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    if cfg.train.threads:
        options.threading.private_threadpool_size = cfg.train.threads
    return options


def cache_file(pairs: Sequence[Pair], cfg: Config) -> Path | None:
    """None unless data.cache is "file"; then the cache file's path under the output folder,
    whose name hashes everything the cached pixels depend on (files, sizes, mask encoding), so
    a changed dataset or config never reads a stale cache."""
    if cfg.data.cache != "file":
        return None
    digest = hashlib.sha256(repr((
        [(str(p.image), p.image.stat().st_size, str(p.mask), p.mask.stat().st_size) for p in pairs],
        cfg.model.image_height, cfg.model.image_width, cfg.model.num_classes, cfg.data.binary_mask,
        cfg.data.mask_threshold, cfg.data.rgb_map, cfg.data.color_tolerance, cfg.data.image_interpolation,
    )).encode()).hexdigest()[:16]
    folder = cfg.output_dir / "tfdata-cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{digest}.npy"


def decide_cache(cfg: Config) -> Config:
    """data.cache "auto" resolved for training on this machine from the train and valid pairs
    (seg_mlops.pair_cache.resolve_cache), with one printed line that gives the numbers; other
    values are kept."""
    if cfg.data.cache != "auto":
        return cfg
    count = len(split_pairs(cfg, "train")) + len(split_pairs(cfg, "valid"))
    mode, line = pair_cache.decide(cfg.data.cache, count, cfg.model.image_height, cfg.model.image_width,
                                   cfg.output_dir)
    print(line)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache=mode))


def make_datasets(cfg: Config, batch_size: int | None = None, repeat: bool = False):
    """(train, valid) pipelines from the config's folders; only train is augmented.

    Args:
        cfg: the experiment config, as `prepare` returned it (pairs validated, encoding decided).
        batch_size: images per batch; None means train.batch_size (a distributed run passes the
            global batch: train.batch_size x replicas).
        repeat: endless pipelines for fit with steps_per_epoch / validation_steps (`steps`).
    """
    train_pairs, valid_pairs = split_pairs(cfg, "train"), split_pairs(cfg, "valid")
    batch_size = batch_size or cfg.train.batch_size
    return (make_dataset(train_pairs, cfg, batch_size=batch_size, shuffle=True, augment=True, repeat=repeat),
            make_dataset(valid_pairs, cfg, batch_size=batch_size, shuffle=False, repeat=repeat))
