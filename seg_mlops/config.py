"""Typed experiment configuration: YAML in, frozen dataclasses out, unknown keys are errors.

One YAML file per dataset. Sections mirror the reference's train_eval_infer.config so its users
feel at home. Every key has a typed default; `load()` rejects unknown keys (naming the closest
valid one), wrong types and out-of-range values, resolves paths relative to the config file, and
applies `--set section.key=value` overrides. `flatten()` gives `model.base_filters`-style names
for MLflow params and Optuna search spaces; `override()` applies such a flat dict.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from seg_mlops.errors import SegMlopsError, did_you_mean


def _key(default: Any, *, lo: float | None = None, hi: float | None = None,
         choices: tuple[str, ...] | None = None, path: bool = False) -> Any:
    """A config field: default plus the checks `load()` applies (range, choices, path)."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "path": path}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    """Where the image/mask pairs are and how masks become labels."""

    root: str = _key("", path=True)  # holds {train,valid,test}/{images,masks}
    # Per-split folders; "" means <root>/<split>/images|masks (reference: [train] image_datapath ...).
    train_images: str = _key("", path=True)
    train_masks: str = _key("", path=True)
    valid_images: str = _key("", path=True)
    valid_masks: str = _key("", path=True)
    test_images: str = _key("", path=True)
    test_masks: str = _key("", path=True)
    # Validation split when the data has none (no valid folder): this seeded fraction of train,
    # whole groups at a time. valid_group is a regex on the file stem whose first group (or whole
    # match) names the group, e.g. "(?:flipped_|rotated_\\d+_)?(.+)" keeps a cell's augmented copies
    # together; "" = every file is its own group.
    valid_fraction: float = _key(0.0, lo=0, hi=0.9)
    valid_group: str = _key("")
    # K-fold cross-validation (seg_mlops.crossval): train and valid are pooled and split into
    # `folds` seeded folds, whole valid_group groups at a time; 0 = off. `fold` is the fold a run
    # validates on (its other folds train it); -1 = all folds, one run each (the CV driver).
    folds: int = _key(0, lo=0)
    fold: int = _key(-1, lo=-1)
    # Binary masks: foreground = max channel >= mask_threshold ("threshold"), or any non-zero
    # pixel ("nonzero": 0/1 label masks, and what the reference's bool cast did). "auto" decides
    # from the data (data.prepare): masks whose values are all 0 or 1 are labels (nonzero), others
    # are thresholded.
    binary_mask: str = _key("auto", choices=("auto", "threshold", "nonzero"))
    mask_threshold: int = _key(128, lo=1, hi=255)
    # Multiclass masks: colour (RGB) of class i at position i; pixels snap to the nearest colour
    # within color_tolerance (Euclidean RGB distance), farther ones are an error.
    rgb_map: tuple[tuple[int, ...], ...] = _key(())
    color_tolerance: float = _key(60.0, lo=0, hi=442)
    # Images are resized with this; masks always with nearest, so labels stay labels.
    image_interpolation: str = _key("area", choices=("area", "linear", "cubic", "nearest"))
    # Keep the decoded, resized pairs of the first epoch so later epochs skip file decoding:
    # "memory" (N*H*W*4 bytes; 1000 images at 256 px = 262 MB), "file" (a memory-mapped file
    # under the output folder, for splits larger than memory), "off" (stream from disk every
    # epoch), or "auto" (decided when training starts, seg_mlops.pair_cache: memory when train +
    # valid fit min(2 GiB, 25 % of the available memory), else file, else off).
    cache: str = _key("off", choices=("off", "memory", "file", "auto"))


@dataclass(frozen=True)
class ModelConfig:
    """UNet hyper-parameters: the keyword arguments of model.build_unet, whose defaults are these."""

    image_height: int = _key(128, lo=1)
    image_width: int = _key(128, lo=1)
    num_classes: int = _key(1, lo=1)  # 1 = binary (sigmoid); >= 2 = softmax over classes
    base_filters: int = _key(16, lo=1)
    num_layers: int = _key(6, lo=1)
    base_kernels: int = _key(3, lo=1)
    dilation: int = _key(1, lo=1)
    dropout_rate: float = _key(0.05, lo=0, hi=0.99)
    batch_norm: bool = _key(False)
    activation: str = _key("relu")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, the monitored metric, callbacks and where outputs go."""

    output_dir: str = _key("", path=True)  # "" means outputs/<experiment> under the working dir
    epochs: int = _key(50, lo=1)
    batch_size: int = _key(4, lo=1)
    learning_rate: float = _key(1e-4, lo=0)
    # How the LR moves: "plateau" keeps learning_rate and lets the reducer below cut it when the
    # monitor stalls; "cosine" warms up linearly over warmup_epochs to learning_rate, then decays it
    # along a cosine to 0 at the last epoch, step by step (a fixed-length recipe: the reducer is
    # off, and early stopping only cuts it short).
    lr_schedule: str = _key("plateau", choices=("plateau", "cosine"))
    warmup_epochs: int = _key(0, lo=0)
    # Wall-clock budget of fit, in minutes (0 = none): training stops after the epoch past which
    # one more epoch (as long as the slowest after the first) would not fit. A training stopped by
    # it has ended (as with early stopping): resuming it only finishes the tracked end. A training
    # killed before its budget ran out starts the clock again when resumed.
    max_minutes: float = _key(0.0, lo=0)
    clipvalue: float = _key(0.5, lo=0)  # 0 disables gradient value clipping
    loss: str = _key("auto")  # "auto": bce_dice_loss (binary) / categorical_crossentropy
    metrics: tuple[str, ...] = _key(())  # (): the task's defaults (losses.for_task)
    # The one name of the monitored metric: checkpoint, early stopping, LR reducer, pruning and
    # the registry all use it. Direction: "min" for *loss, else "max". "auto" (resolved at load):
    # the foreground dice, val_dice_coef for binary, val_class_dice for multiclass (dice_coef
    # sums the background channel too, which for one-hot masks is close to pixel accuracy).
    monitor: str = _key("auto")
    patience: int = _key(10, lo=0)  # early stopping; 0 disables
    reducer_factor: float = _key(0.5, lo=0, hi=1)  # ReduceLROnPlateau factor
    reducer_patience: int = _key(5, lo=0)  # 0 disables the LR reducer
    # Epoch inference: panels (input | truth | prediction) of the first N pairs, every epoch.
    epoch_infer_count: int = _key(6, lo=0)  # 0 disables
    epoch_infer_images: str = _key("", path=True)  # "" means the valid split
    epoch_infer_masks: str = _key("", path=True)
    # Scale (TensorFlow's own engines): tf.distribute strategy, Keras mixed-precision policy (the
    # output layer and the loss stay float32), XLA ("auto": Keras decides, i.e. on for GPUs), and
    # batches per compiled step. batch_size is per replica: global batch = batch_size x replicas.
    distribute: str = _key("none", choices=("none", "mirrored", "multi_worker"))
    # "auto" (decided when training starts, train.resolve_precision): mixed_float16 on GPUs with
    # tensor cores (compute capability >= 7.0), mixed_bfloat16 on CPUs with native bfloat16
    # (avx512_bf16 or amx_bf16 in /proc/cpuinfo), float32 otherwise.
    mixed_precision: str = _key("float32", choices=("float32", "mixed_float16", "mixed_bfloat16", "auto"))
    jit_compile: str = _key("auto", choices=("auto", "on", "off"))
    steps_per_execution: int = _key(1, lo=1)
    # CPU threads of this process: 0 = TensorFlow's defaults (the model's ops use every core and
    # tf.data sizes its own pool); n > 0 = n intra-op threads for the model, min(2, n) inter-op threads,
    # and a tf.data pool of n threads: for sharing a machine (e.g. tuning workers side by side).
    # Set once per process, before TensorFlow starts (train.apply_threads).
    threads: int = _key(0, lo=0)
    # CPU, memory, disk, network (and GPU when present) as `system/*` metrics of the run, sampled
    # by MLflow's system-metrics monitor (needs psutil; GPUs need nvidia-ml-py).
    system_metrics: bool = _key(True)


@dataclass(frozen=True)
class InferConfig:
    """How predicted probabilities become mask files."""

    threshold: float = _key(0.5, lo=0, hi=1)  # binary: foreground where probability >= threshold
    batch_size: int = _key(8, lo=1)
    colorize: bool = _key(False)  # also write colour masks to <output>/colorized
    overlay: bool = _key(False)  # also write image+mask blends to <output>/overlay
    overlay_alpha: float = _key(0.4, lo=0, hi=1)


@dataclass(frozen=True)
class AugmentConfig:
    """Online augmentation of the training split, inside the tf.data pipeline.

    Each op has a probability (0 disables it) and is drawn independently per sample. Geometric ops
    warp image and mask with the same field (the mask by nearest neighbour, so labels stay labels);
    sharpening and brightening change the image only. Parameters are in pixels of the model's input
    size, named after the reference's [augmentor], [deformation], [distortion], [barrdistortion],
    [pincdistortion], [sharpening] and [brightening] keys. Validation data is never augmented.
    """

    hflip: float = _key(0.0, lo=0, hi=1)
    vflip: float = _key(0.0, lo=0, hi=1)
    rotation: float = _key(0.0, lo=0, hi=1)
    angles: tuple[float, ...] = _key((90.0, 180.0, 270.0))  # one drawn per rotated sample (degrees)
    shrink: float = _key(0.0, lo=0, hi=1)
    shrinks: tuple[float, ...] = _key((0.8,))  # one scale drawn; the shrunk pair is centred
    shear: float = _key(0.0, lo=0, hi=1)
    shears: tuple[float, ...] = _key((0.1,))  # one shear factor drawn
    deformation: float = _key(0.0, lo=0, hi=1)  # elastic (Simard): smoothed random field
    deformation_alpha: float = _key(1300.0, lo=0)  # field strength (reference [deformation] alpah)
    deformation_sigmas: tuple[float, ...] = _key((8.0,))  # smoothing sigma, one drawn (sigmoids)
    distortion: float = _key(0.0, lo=0, hi=1)  # smooth random displacement (reference [distortion])
    distortions: tuple[float, ...] = _key((0.02,))  # max displacement as a fraction of the width
    distortion_sigma: float = _key(40.0, lo=0)  # smoothing sigma (gaussian_filter_rsigma)
    grid: float = _key(0.0, lo=0, hi=1)  # grid distortion: cells stretched by random steps
    grid_steps: int = _key(5, lo=1)  # cells per side
    grid_limit: float = _key(0.3, lo=0, hi=0.9)  # max relative stretch of a cell
    barrel: float = _key(0.0, lo=0, hi=1)
    barrel_radius: float = _key(0.5, lo=0)  # fraction of the width
    barrel_amount: float = _key(0.5)
    barrel_centers: tuple[tuple[float, ...], ...] = _key(((0.5, 0.5),))  # (x, y) fractions, one drawn
    pincushion: float = _key(0.0, lo=0, hi=1)
    pincushion_radius: float = _key(0.5, lo=0)
    pincushion_amount: float = _key(-0.5)
    pincushion_centers: tuple[tuple[float, ...], ...] = _key(((0.5, 0.5),))
    sharpening: float = _key(0.0, lo=0, hi=1)  # image only
    sharpening_k: float = _key(1.0, lo=0)  # 3x3 kernel: -k around, 1+8k centre
    brightening: float = _key(0.0, lo=0, hi=1)  # image only: pixel*alpha + beta
    brightening_alpha: float = _key(1.2, lo=0)
    brightening_beta: float = _key(10.0)


@dataclass(frozen=True)
class TiledInferConfig:
    """Inference on images larger than the model: tiles predicted in batches and stitched back.

    `mode`: "average" blends overlapping tiles with a smooth window (the default), "context" uses
    the overlap as context and pastes each tile's centre (the reference's way), "bitwise_blending"
    intersects the tiled binary mask with the whole-image prediction (the reference's option).
    """

    tile_size: int = _key(0, lo=0)  # px of the original image per tile; 0 = the model's input size
    overlap: int = _key(64, lo=0)  # px each tile reaches into its neighbours
    mode: str = _key("average", choices=("average", "context", "bitwise_blending"))
    batch_size: int = _key(8, lo=1)  # tiles per forward pass
    # Tiled epoch inference (the reference's epoch_change_tiledinfer): the first N large images of
    # epoch_infer_images, panels logged as epoch_tiled_infer/<stem>. 0 disables.
    epoch_infer_count: int = _key(0, lo=0)
    epoch_infer_images: str = _key("", path=True)
    epoch_infer_masks: str = _key("", path=True)


# The default search space: categorical lists, or {low, high[, step][, log]} ranges whose type
# (int or float) is the key's own. Any flattened key of data/model/train can be searched.
DEFAULT_SPACE = {
    "model.base_filters": [8, 16, 32],
    "model.base_kernels": [3, 5, 7, 9],
    "model.dilation": [1, 2, 3],
    "train.learning_rate": {"low": 1e-5, "high": 1e-2, "log": True},
}


@dataclass(frozen=True)
class TuneConfig:
    """The Optuna study of this dataset (study name = experiment)."""

    space: dict = _key(DEFAULT_SPACE)
    epochs: int = _key(8, lo=1)  # epochs per trial (replaces train.epochs in trials)
    n_trials: int = _key(20, lo=1)  # finished trials the study aims at, all workers together
    timeout: float = _key(0.0, lo=0)  # seconds per launch; 0 = no limit
    sampler: str = _key("tpe", choices=("tpe", "random"))
    pruner: str = _key("median", choices=("median", "hyperband", "none"))
    warmup_epochs: int = _key(2, lo=0)  # median pruner: epochs a trial runs before it can be pruned
    # "" = the journal file tracking/optuna.journal (one machine, many processes); else any
    # Optuna storage URL, e.g. postgresql://user@host/optuna for many machines.
    storage: str = _key("")
    heartbeat_seconds: int = _key(30, lo=1)  # RDB storages: a trial silent 2x this long is retried
    # Where trials upload their pictures (optuna.artifacts; seg-mlops dashboard shows them):
    # "" = optuna-artifacts beside the journal file (tracking/ for a database). Several machines
    # need one shared folder.
    artifact_dir: str = _key("", path=True)
    # Cross-validated study: a trial trains this many folds (data.folds), its value is the mean
    # of the folds' best monitored values, and it may be pruned between folds; 0 = off.
    folds: int = _key(0, lo=0)


@dataclass(frozen=True)
class GateConfig:
    """The promotion gate and `seg-mlops compare`: two models' per-image test dice, paired, with a
    bootstrap interval of the mean difference (seeded by the config's `seed`); champion moves only
    when the interval lies above 0."""

    confidence: float = _key(0.95, lo=0.5, hi=0.999)  # of the interval
    resamples: int = _key(10000, lo=100)  # bootstrap resamples


@dataclass(frozen=True)
class Config:
    """The whole experiment. `experiment` names the dataset (MLflow experiment, Optuna study)."""

    experiment: str = _key("default")
    seed: int = _key(137, lo=0)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    tiled_infer: TiledInferConfig = field(default_factory=TiledInferConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir or Path("outputs") / self.experiment)

    def split_dirs(self, split: str) -> tuple[Path, Path]:
        """(images, masks) folders of `split` ("train", "valid" or "test")."""
        images = getattr(self.data, f"{split}_images") or Path(self.data.root) / split / "images"
        masks = getattr(self.data, f"{split}_masks") or Path(self.data.root) / split / "masks"
        return Path(images), Path(masks)

    def palette(self) -> list[tuple[int, int, int]]:
        """Colour per class for colour masks, overlays and panels (binary: green on black,
        as every seed experiment colours its masks)."""
        if self.model.num_classes == 1:
            return [(0, 0, 0), (0, 255, 0)]
        return [tuple(c) for c in self.data.rgb_map]


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig,
                             "augment": AugmentConfig, "infer": InferConfig,
                             "tiled_infer": TiledInferConfig, "tune": TuneConfig, "gate": GateConfig}


# ----------------------------------------------------------------------------- conversion

def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML value to the field's type, or raise naming the key and the value."""
    bad = SegMlopsError(f"{key}={value!r}: expected {_type_name(hint)}")
    origin = typing.get_origin(hint)
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise bad
        return tuple(_coerce(key, v, item_hint) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if hint is float:
        if isinstance(value, bool):
            raise bad
        try:  # PyYAML reads "1e-4" (no dot) as a string: accept it as the float users meant
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(number):  # NaN would pass every range check below
            raise SegMlopsError(f"{key}={value!r}: expected a finite number")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    if hint is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise bad
    raise AssertionError(f"unsupported config type {hint}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}[hint]


def _check(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices and value not in choices:
        raise SegMlopsError(f"{key}={value!r}: must be one of {', '.join(choices)}")
    if lo is not None and value < lo:
        raise SegMlopsError(f"{key}={value!r}: must be >= {lo}")
    if hi is not None and value > hi:
        raise SegMlopsError(f"{key}={value!r}: must be <= {hi}")


def _build(cls: type, values: Mapping[str, Any], prefix: str, base: Path | None) -> Any:
    """Instantiate dataclass `cls` from a mapping, checking every key."""
    if not isinstance(values, Mapping):
        raise SegMlopsError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = prefix + str(name)
        if name not in fields:
            raise SegMlopsError(f"unknown config key '{key}'" + did_you_mean(str(name), fields, prefix))
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {} if value is None else value, key + ".", base)
            continue
        meta = fields[name].metadata
        if isinstance(value, bool) and hints[name] is str and {"on", "off"} & set(meta.get("choices") or ()):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        value = _coerce(key, value, hints[name])
        _check(key, value, meta)
        if meta.get("path") and value and base is not None:
            value = os.path.normpath(base / os.path.expanduser(value))
        kwargs[name] = value
    return cls(**kwargs)


def _validate(cfg: Config) -> Config:
    """Checks that span keys."""
    m, d = cfg.model, cfg.data
    name = cfg.experiment
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        # It names folders (outputs/<experiment>, tracking/artifacts/<experiment>): a path in it
        # would make training write outside them.
        raise SegMlopsError(f"experiment={name!r}: must be a plain name without / or \\ (it names the "
                            "output folder, the MLflow experiment and the Optuna study)")
    if m.num_classes >= 2:
        if len(d.rgb_map) != m.num_classes:
            raise SegMlopsError(
                f"data.rgb_map has {len(d.rgb_map)} colours but model.num_classes={m.num_classes}: "
                "give one [r, g, b] per class, background first")
        for colour in d.rgb_map:
            if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
                raise SegMlopsError(f"data.rgb_map entry {list(colour)}: expected [r, g, b] with values 0..255")
        if len({tuple(c) for c in d.rgb_map}) != len(d.rgb_map):
            raise SegMlopsError(f"data.rgb_map has a repeated colour: {[list(c) for c in d.rgb_map]}")
    elif d.rgb_map:
        raise SegMlopsError("data.rgb_map is set but model.num_classes=1 (binary): "
                            "set model.num_classes to the number of colours, or remove data.rgb_map")
    check_model(m)
    if d.valid_group:
        try:
            re.compile(d.valid_group)
        except re.error as exc:
            raise SegMlopsError(f"data.valid_group={d.valid_group!r}: not a regular expression ({exc})") from None
    _validate_folds(cfg)
    _validate_schedule(cfg.train)
    _validate_augment(cfg.augment)
    _validate_space(cfg.tune.space)
    if cfg.train.monitor == "auto":
        monitor = "val_dice_coef" if m.num_classes == 1 else "val_class_dice"
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, monitor=monitor))
    return cfg


def _validate_folds(cfg: Config) -> None:
    """data.folds / data.fold / tune.folds: k-fold needs k >= 2, a fold inside 0..k-1, and its own
    validation (valid_fraction would carve a second one out of train)."""
    d = cfg.data
    for key, k in (("data.folds", d.folds), ("tune.folds", cfg.tune.folds)):
        if k == 1:
            raise SegMlopsError(f"{key}=1: cross-validation needs at least 2 folds (0 = off); use e.g. 5")
        if k and d.valid_fraction:
            raise SegMlopsError(f"{key}={k} pools train and valid and validates on each fold in turn: "
                                f"data.valid_fraction={d.valid_fraction:g} has no meaning then; set it to 0")
    if d.fold != -1 and not 0 <= d.fold < d.folds:
        raise SegMlopsError(f"data.fold={d.fold} is not a fold of data.folds={d.folds}: use 0..{max(d.folds - 1, 0)}, "
                            "or -1 for all folds" + ("" if d.folds else " (and set data.folds)"))


def _validate_schedule(t: TrainConfig) -> None:
    """A cosine schedule needs at least one epoch after its warm-up; the warm-up only exists in it."""
    if t.lr_schedule == "cosine" and t.warmup_epochs >= t.epochs:
        raise SegMlopsError(f"train.warmup_epochs={t.warmup_epochs} leaves no epoch of train.epochs={t.epochs} "
                            "for the cosine decay; use fewer warm-up epochs")
    if t.lr_schedule == "plateau" and t.warmup_epochs:
        raise SegMlopsError(f"train.warmup_epochs={t.warmup_epochs} needs train.lr_schedule: cosine "
                            "(the plateau schedule has no warm-up); set it, or set warmup_epochs: 0")


def check_model(m: ModelConfig) -> None:
    """Raise SegMlopsError naming the model.* keys if model.build_unet could not build `m`.

    The one home of the model's rules: config loading calls it (so `--set` mistakes fail before any
    work) and so does model.check_args (direct build_unet calls, and tuning.trial_config, which
    prunes a trial it rejects). Keras-free, so that loading a config stays light; only
    model.activation needs Keras and is checked by model.check_args.
    """
    if m.num_layers < 1:
        raise SegMlopsError(f"model.num_layers={m.num_layers} must be >= 1; use e.g. 4 to 6")
    if m.base_filters < 1:
        raise SegMlopsError(f"model.base_filters={m.base_filters} must be >= 1; use e.g. 16")
    if m.base_kernels < 1 or m.base_kernels % 2 == 0:
        raise SegMlopsError(f"model.base_kernels={m.base_kernels} must be an odd number >= 1; use e.g. 3, 5 or 7")
    if m.dilation < 1:
        raise SegMlopsError(f"model.dilation={m.dilation} must be >= 1; use 1 for no dilation")
    if not 0 <= m.dropout_rate < 1:
        raise SegMlopsError(f"model.dropout_rate={m.dropout_rate} must be in [0, 1); use e.g. 0.05")
    _check_dropout_depth(m.dropout_rate, m.num_layers)
    if m.num_classes < 1:
        raise SegMlopsError(f"model.num_classes={m.num_classes} must be >= 1; use 1 for a binary mask")
    if m.image_height < 1 or m.image_width < 1:
        raise SegMlopsError(f"model.image_height={m.image_height} and model.image_width={m.image_width} "
                            "must both be >= 1; set positive sizes")
    _check_divisible("image_height", m.image_height, m.num_layers)
    _check_divisible("image_width", m.image_width, m.num_layers)


def _check_dropout_depth(rate: float, num_layers: int) -> None:
    """Level i drops `rate * i` (the same product as build_unet): at the bridge it must stay below
    1, else Keras either raises deep in the build (> 1) or silently drops everything (= 1)."""
    bridge = num_layers - 1
    if rate * bridge < 1:
        return
    largest = (math.ceil(100 / bridge) - 1) / 100  # the largest two-decimal rate below 1 / bridge
    raise SegMlopsError(
        f"model.dropout_rate={rate} with model.num_layers={num_layers} gives the bridge (level {bridge}) a "
        f"dropout of {rate * bridge:.3g}, which must be below 1 (level i drops dropout_rate * i); "
        f"use model.dropout_rate <= {largest:g}, or fewer model.num_layers")


def _check_divisible(key: str, size: int, num_layers: int) -> None:
    """Every pooling halves the size: the decoder's upsampled maps must match the skips exactly."""
    divisor = 2 ** (num_layers - 1)
    if size % divisor == 0:
        return
    lower = size // divisor * divisor
    upper = lower + divisor
    suggestion = f"{lower} or {upper}" if lower > 0 else f"{upper}"
    raise SegMlopsError(f"model.{key}={size} is not divisible by 2**(num_layers-1)={divisor} "
                        f"(model.num_layers={num_layers}); use {suggestion}, or fewer layers")


# Each augmentation list, the op whose probability uses it, and what its entries must be.
_AUGMENT_LISTS = {"angles": "rotation", "shrinks": "shrink", "shears": "shear",
                  "deformation_sigmas": "deformation", "distortions": "distortion",
                  "barrel_centers": "barrel", "pincushion_centers": "pincushion"}


def _validate_augment(a: AugmentConfig) -> None:
    """An op that can fire needs a value to draw; entries must make a valid warp."""
    for key, op in _AUGMENT_LISTS.items():
        if getattr(a, op) > 0 and not getattr(a, key):
            raise SegMlopsError(f"augment.{key} is empty but augment.{op}={getattr(a, op)}: "
                                f"give at least one value, or set augment.{op}: 0")
    for s in a.shrinks:
        if s <= 0:
            raise SegMlopsError(f"augment.shrinks has {s}: scales must be > 0 (0.8 = 80 % of the size)")
    for s in a.deformation_sigmas:
        if s <= 0:
            raise SegMlopsError(f"augment.deformation_sigmas has {s}: sigmas must be > 0 (pixels)")
    if a.distortion > 0 and a.distortion_sigma <= 0:
        raise SegMlopsError(f"augment.distortion_sigma={a.distortion_sigma}: must be > 0 (pixels)")
    for d in a.distortions:
        if d < 0:
            raise SegMlopsError(f"augment.distortions has {d}: displacements must be >= 0 (fraction of the size)")
    for op in ("barrel", "pincushion"):
        if getattr(a, op) > 0 and getattr(a, f"{op}_radius") <= 0:
            raise SegMlopsError(f"augment.{op}_radius={getattr(a, f'{op}_radius')}: must be > 0 "
                                f"(fraction of the width) when augment.{op} > 0")
        for centre in getattr(a, f"{op}_centers"):
            if len(centre) != 2 or not all(0 <= c <= 1 for c in centre):
                raise SegMlopsError(f"augment.{op}_centers entry {list(centre)}: expected an [x, y] pair "
                                    "of fractions of the width and height, 0..1")


def _validate_space(space: Mapping[str, Any]) -> None:
    """Every searched key exists and every choice or bound has the key's own type."""
    searchable = {f"{name}.{f.name}": (typing.get_type_hints(section)[f.name], f.metadata)
                  for name, section in SECTIONS.items() if name not in ("tune", "gate")
                  for f in dataclasses.fields(section)}
    for key, spec in space.items():
        where = f"tune.space.{key}"
        if key not in searchable:
            raise SegMlopsError(f"unknown key '{where}'" + did_you_mean(str(key), searchable, "tune.space."))
        hint, meta = searchable[key]
        if meta.get("path") or typing.get_origin(hint) is tuple:
            raise SegMlopsError(f"{where}: paths and lists cannot be searched")
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise SegMlopsError(f"{where}: give at least one choice")
            for value in spec:
                _check(where, _coerce(where, value, hint), meta)
            continue
        if not isinstance(spec, Mapping) or hint not in (int, float) or not {"low", "high"} <= set(spec) \
                or not set(spec) <= {"low", "high", "step", "log"}:
            raise SegMlopsError(f"{where}={spec!r}: expected a list of choices, or for numbers "
                                "{low: .., high: .., step: .. (optional), log: true|false (optional)}")
        low, high = (_coerce(f"{where}.{b}", spec[b], hint) for b in ("low", "high"))
        for value in (low, high):
            _check(where, value, meta)
        if not low < high:
            raise SegMlopsError(f"{where}: low={low} must be below high={high}")
        if spec.get("log") and low <= 0:
            raise SegMlopsError(f"{where}: a log range needs low > 0, got {low}")
        if not isinstance(spec.get("log", False), bool):
            raise SegMlopsError(f"{where}.log={spec['log']!r}: expected true or false")


# ----------------------------------------------------------------------------- public API

def load(path: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()) -> Config:
    """Read a YAML config (None: all defaults) and apply overrides.

    Args:
        path: the YAML file; relative paths inside it are relative to its folder. (The CLI reads
            the reference's `.config` files too: seg_mlops.loading picks the reader by suffix.)
        overrides: `section.key=value` strings (as given to `--set`; values parsed as YAML,
            paths relative to the working directory) or a flat `{section.key: value}` mapping.
    """
    if path is None:
        return from_mapping({}, overrides=overrides)
    path = Path(path)
    if not path.is_file():
        raise SegMlopsError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise SegMlopsError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return from_mapping(raw, base=path.resolve().parent, overrides=overrides)


def from_mapping(raw: Any, base: Path | None = None,
                 overrides: Iterable[str] | Mapping[str, Any] = ()) -> Config:
    """A checked Config from a nested mapping as a YAML file holds it (every key, type and range).

    Args:
        raw: `{"experiment": ..., "model": {...}, ...}`; absent keys keep their defaults.
        base: the folder relative paths in `raw` are resolved from; None keeps them as given.
        overrides: as for load().
    """
    # Cross-key checks run once, after the overrides: `--set model.num_classes=2` may be what
    # makes the file's rgb_map consistent.
    return _validate(_apply(_build(Config, raw, "", base), overrides))


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`["model.base_filters=32", ...]` -> `{"model.base_filters": 32}` (values parsed as YAML)."""
    flat = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SegMlopsError(f"--set {item!r}: expected section.key=value, e.g. train.epochs=3")
        flat[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return flat


def override(cfg: Config, overrides: Iterable[str] | Mapping[str, Any]) -> Config:
    """A new Config with flat `section.key` overrides applied and checked (paths from the cwd)."""
    return _validate(_apply(cfg, overrides))


def _apply(cfg: Config, overrides: Iterable[str] | Mapping[str, Any]) -> Config:
    flat = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    if not flat:
        return cfg
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, name = key.rpartition(".")
        if not section and name in SECTIONS:
            raise SegMlopsError(f"--set {key}=...: name a key of the section, e.g. {key}.{next(iter(dataclasses.fields(SECTIONS[name]))).name}=...")
        if section and section not in SECTIONS:
            raise SegMlopsError(f"unknown config section '{section}' in '{key}'" + did_you_mean(section, SECTIONS))
        (nested.setdefault(section, {}) if section else nested)[name] = value
    changed = _build(Config, {k: v for k, v in nested.items() if k not in SECTIONS}, "", Path.cwd())
    replace = {k: getattr(changed, k) for k in nested if k not in SECTIONS}
    for section, values in nested.items():
        if section in SECTIONS:
            part = _build(SECTIONS[section], values, section + ".", Path.cwd())
            replace[section] = dataclasses.replace(
                getattr(cfg, section), **{k: getattr(part, k) for k in values})
    return dataclasses.replace(cfg, **replace)


def flatten(cfg: Config) -> dict[str, Any]:
    """`{"experiment": ..., "model.base_filters": 16, ...}`: one entry per key, lists kept."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                flat[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
        else:
            flat[f.name] = value
    return flat


def redact(url: str) -> str:
    """A URL without its password (`user:password@host`, or a `password=` query parameter), fit
    for params, tags, files and messages. Anything that is not a URL comes back unchanged."""
    if "://" not in url:
        return url
    parts = urllib.parse.urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        credentials, host = netloc.rsplit("@", 1)
        netloc = f"{credentials.split(':', 1)[0]}@{host}"
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", query, flags=re.IGNORECASE)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def public(cfg: Config) -> Config:
    """The config as it may be logged (MLflow params, config.yaml): tune.storage without its password."""
    storage = redact(cfg.tune.storage)
    if storage == cfg.tune.storage:
        return cfg
    return dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, storage=storage))


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), e.g. to write the resolved config as YAML."""
    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
    return {k: ({kk: plain(vv) for kk, vv in v.items()} if isinstance(v, dict) else plain(v))
            for k, v in dataclasses.asdict(cfg).items()}


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
