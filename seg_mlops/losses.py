"""Segmentation losses and metrics, and the name -> function lookup the config uses.

Conventions: ``y_true`` and ``y_pred`` are float tensors of shape (batch, H, W, C).
Binary (C == 1): ``y_true`` in {0, 1}, ``y_pred`` a sigmoid probability.
Multiclass (C >= 2): ``y_true`` one-hot, ``y_pred`` a softmax.

Every function is registered with Keras so a saved ``.keras`` model reloads without
``custom_objects`` (as long as this module has been imported). Function names are
kept stable because Keras turns them into log keys such as ``val_dice_coef``.
"""

from __future__ import annotations

from typing import Callable

import keras
from keras import ops

from seg_mlops.errors import SegMlopsError, did_you_mean

LossFn = Callable[..., object]

_register = keras.saving.register_keras_serializable(package="seg_mlops")


def _as_float32(y_true, y_pred):
    # Mixed-precision models emit float16 predictions and datasets may yield uint8
    # masks; computing sums in float32 avoids overflow and dtype mismatches.
    return ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")


# --- binary / batch-global -------------------------------------------------------


@_register
def dice_coef(y_true, y_pred, smooth: float = 1.0):
    """Batch-global Dice: every element of the batch flattened into one vector.

    This is exactly the formula the reference (antillia Tensorflow-Image-Segmentation-API)
    publishes, so our numbers compare with theirs: (2*sum(y*p) + s) / (sum(y) + sum(p) + s).

    Args:
        y_true: ground truth, (batch, H, W, C).
        y_pred: predicted probabilities, same shape.
        smooth: added to numerator and denominator; makes empty/empty equal 1.
    """
    y_true, y_pred = _as_float32(y_true, y_pred)
    intersection = ops.sum(y_true * y_pred)
    return (2.0 * intersection + smooth) / (ops.sum(y_true) + ops.sum(y_pred) + smooth)


@_register
def dice_loss(y_true, y_pred):
    """1 - dice_coef.

    Args:
        y_true: ground truth, (batch, H, W, C).
        y_pred: predicted probabilities, same shape.
    """
    return 1.0 - dice_coef(y_true, y_pred)


@_register
def bce_dice_loss(y_true, y_pred):
    """0.5 * (mean binary cross-entropy + dice_loss): the reference's binary default.

    Args:
        y_true: ground truth in {0, 1}, (batch, H, W, 1).
        y_pred: sigmoid probabilities, same shape.
    """
    y_true, y_pred = _as_float32(y_true, y_pred)
    # keras' binary_crossentropy averages over the last axis; the outer mean
    # reduces the remaining (batch, H, W) to one scalar.
    bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred))
    return 0.5 * (bce + dice_loss(y_true, y_pred))


@_register
def iou_coef(y_true, y_pred, smooth: float = 1.0):
    """Batch-global smoothed IoU: (sum(y*p) + s) / (sum(y) + sum(p) - sum(y*p) + s).

    The reference had no smoothing and returned NaN for empty truth and empty
    prediction; with smoothing that case is a perfect 1.

    Args:
        y_true: ground truth, (batch, H, W, C).
        y_pred: predicted probabilities, same shape.
        smooth: added to numerator and denominator.
    """
    y_true, y_pred = _as_float32(y_true, y_pred)
    intersection = ops.sum(y_true * y_pred)
    union = ops.sum(y_true) + ops.sum(y_pred) - intersection
    return (intersection + smooth) / (union + smooth)


@_register
def iou_loss(y_true, y_pred):
    """1 - iou_coef.

    Args:
        y_true: ground truth, (batch, H, W, C).
        y_pred: predicted probabilities, same shape.
    """
    return 1.0 - iou_coef(y_true, y_pred)


# --- multiclass ------------------------------------------------------------------


@_register
def per_class_dice(y_true, y_pred, smooth: float = 1.0):
    """Dice for each channel (sums over batch, H, W): a vector of C values.

    Used by evaluation to report every class; not a Keras metric (it is not a scalar).

    Args:
        y_true: one-hot ground truth, (batch, H, W, C).
        y_pred: softmax (or sigmoid for C == 1), same shape.
        smooth: added to numerator and denominator of each class's dice.
    """
    y_true, y_pred = _as_float32(y_true, y_pred)
    axes = tuple(range(len(y_true.shape) - 1))
    intersection = ops.sum(y_true * y_pred, axis=axes)
    denom = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return (2.0 * intersection + smooth) / (denom + smooth)


# --- split-level metrics (stateful) ----------------------------------------------
#
# The empty rule, the same for every per-image and per-class score here and in evaluate: a score
# needs something to find. An image (or class) whose truth holds no foreground is skipped, not
# scored 1 and not scored 0; false positives on such images are counted separately by evaluate.
# These metrics accumulate over the whole split, so their value does not depend on the batch
# size or on how images fall into batches: Keras' val_* and evaluate's test_* are the same
# computation. A split with nothing to score gives NaN (data.prepare refuses such splits first).


def _foreground_sums(y_true, y_pred, channels: int, per_image: bool):
    """(intersection, truth, predicted) pixel sums of the foreground channels (the one sigmoid
    channel, or 1..C-1 of a softmax): per class over the batch, or per image and class."""
    y_true, y_pred = _as_float32(y_true, y_pred)
    if channels > 1:
        y_true, y_pred = y_true[..., 1:], y_pred[..., 1:]
    axes = tuple(range(1 if per_image else 0, len(y_true.shape) - 1))
    return ops.sum(y_true * y_pred, axis=axes), ops.sum(y_true, axis=axes), ops.sum(y_pred, axis=axes)


@_register
class ClassDice(keras.metrics.Metric):
    """Soft dice of each foreground class over the whole split, then the mean over the classes
    present in the split's truth (absent classes are skipped, see the empty rule above).

    Binary: the dice of the foreground over the split. Multiclass: background (channel 0) is left
    out, so 74 % background cannot make a poor model look good (dice_coef sums every channel
    including background, which for one-hot masks is close to pixel accuracy).

    Args:
        num_classes: output channels of the model (1 = binary).
        name: the log key (val_ + name during fit).
    """

    def __init__(self, num_classes: int = 1, name: str = "class_dice", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = num_classes
        classes = max(1, num_classes - 1) if num_classes > 1 else 1
        self.intersection = self.add_variable(shape=(classes,), initializer="zeros", name="intersection")
        self.truth = self.add_variable(shape=(classes,), initializer="zeros", name="truth")
        self.predicted = self.add_variable(shape=(classes,), initializer="zeros", name="predicted")

    def update_state(self, y_true, y_pred, sample_weight=None):
        for variable, value in zip((self.intersection, self.truth, self.predicted),
                                   _foreground_sums(y_true, y_pred, self.num_classes, per_image=False)):
            variable.assign_add(value)

    def result(self):
        present = ops.cast(self.truth > 0, "float32")
        dice = 2.0 * self.intersection / ops.maximum(self.truth + self.predicted, 1e-7)
        return ops.sum(dice * present) / ops.sum(present)  # 0/0 = NaN: nothing to score

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


@_register
class ImageDice(keras.metrics.Metric):
    """Soft dice of each image (the mean over the foreground classes its truth holds), then the
    mean over the split's images whose truth holds foreground (images with an empty truth are
    skipped, see the empty rule above).

    Unlike dice_coef, a small lesion in one image is not drowned out by a large one in another.

    Args:
        num_classes: output channels of the model (1 = binary).
        name: the log key (val_ + name during fit).
    """

    def __init__(self, num_classes: int = 1, name: str = "image_dice", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = num_classes
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        intersection, truth, predicted = _foreground_sums(y_true, y_pred, self.num_classes, per_image=True)
        dice = 2.0 * intersection / ops.maximum(truth + predicted, 1e-7)  # (batch, classes)
        present = ops.cast(truth > 0, "float32")
        classes = ops.sum(present, axis=-1)  # foreground classes in each image's truth
        image = ops.sum(dice * present, axis=-1) / ops.maximum(classes, 1.0)
        scored = ops.cast(classes > 0, "float32")
        self.total.assign_add(ops.sum(image * scored))
        self.count.assign_add(ops.sum(scored))

    def result(self):
        return self.total / self.count  # 0/0 = NaN: nothing to score

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


@_register
def class_dice_bg(y_true, y_pred, smooth: float = 1.0):
    """Mean per-class dice over all C channels, background included.

    Args:
        y_true: one-hot ground truth, (batch, H, W, C).
        y_pred: softmax probabilities, same shape.
        smooth: added to numerator and denominator of each class's dice.
    """
    return ops.mean(per_class_dice(y_true, y_pred, smooth))


@_register
def cce_dice_loss(y_true, y_pred):
    """0.5 * (mean categorical cross-entropy + (1 - class_dice_bg)): a multiclass default.

    Background is kept in the dice term so every output channel gets a gradient.

    Args:
        y_true: one-hot ground truth, (batch, H, W, C), C >= 2.
        y_pred: softmax probabilities, same shape.
    """
    y_true, y_pred = _as_float32(y_true, y_pred)
    cce = ops.mean(keras.losses.categorical_crossentropy(y_true, y_pred))
    return 0.5 * (cce + (1.0 - class_dice_bg(y_true, y_pred)))


@_register
def cce_class_dice_loss(y_true, y_pred):
    """0.5 * (mean categorical cross-entropy + (1 - mean dice of the foreground classes)): the
    multiclass loss for rare classes. Cross-entropy is dominated by the frequent classes; in the
    dice term every foreground class weighs the same whatever its pixel share (a 0.6 % class as
    much as a 17 % one), and the background, which cross-entropy already covers, is left out.

    Args:
        y_true: one-hot ground truth, (batch, H, W, C), C >= 2.
        y_pred: softmax probabilities, same shape.
    """
    y_true, y_pred = _as_float32(y_true, y_pred)
    cce = ops.mean(keras.losses.categorical_crossentropy(y_true, y_pred))
    return 0.5 * (cce + (1.0 - ops.mean(per_class_dice(y_true, y_pred)[1:])))


# --- registries ------------------------------------------------------------------

# Sparse categorical cross-entropy is deliberately absent: our data pipeline always
# yields one-hot labels, and a sparse loss on one-hot targets fails or misleads.
LOSSES: dict[str, LossFn] = {
    "bce_dice_loss": bce_dice_loss,
    "dice_loss": dice_loss,
    "iou_loss": iou_loss,
    "cce_dice_loss": cce_dice_loss,
    "cce_class_dice_loss": cce_class_dice_loss,
    "binary_crossentropy": keras.losses.binary_crossentropy,
    "categorical_crossentropy": keras.losses.categorical_crossentropy,
}

# Functions are Keras' batch-averaged metrics; classes are split-level (built per model with its
# channel count, see ClassDice).
METRICS: dict[str, LossFn | type] = {
    "dice_coef": dice_coef,
    "iou_coef": iou_coef,
    "image_dice": ImageDice,
    "class_dice": ClassDice,
    "class_dice_bg": class_dice_bg,
    "binary_accuracy": keras.metrics.binary_accuracy,
    "categorical_accuracy": keras.metrics.categorical_accuracy,
}

# Names that run without error on the wrong task but give meaningless numbers:
# categorical_* normalise over a single channel (loss always 0, accuracy always 1),
# binary_* on one-hot softmax score each channel as an independent label.
# Each maps to the name the user most likely meant for the other task.
_BINARY_ONLY = {
    "binary_crossentropy": "categorical_crossentropy",
    "binary_accuracy": "categorical_accuracy",
}
_MULTICLASS_ONLY = {
    "categorical_crossentropy": "binary_crossentropy",
    "categorical_accuracy": "binary_accuracy",
    "cce_dice_loss": "bce_dice_loss",
    "cce_class_dice_loss": "bce_dice_loss",
}

_BINARY_DEFAULTS = ("bce_dice_loss", ("dice_coef", "iou_coef", "image_dice"))
_MULTICLASS_DEFAULTS = ("categorical_crossentropy", ("dice_coef", "class_dice", "class_dice_bg"))


def _lookup(kind: str, name: str, table: dict[str, LossFn], where: str) -> LossFn:
    if isinstance(name, str) and name in table:
        return table[name]
    raise SegMlopsError(f"unknown {kind} {name!r} ({where})" + did_you_mean(str(name), table))


def get_loss(name: str, where: str = "train.loss") -> LossFn:
    """Return the loss function registered under ``name``.

    Args:
        name: a key of LOSSES, e.g. "bce_dice_loss".
        where: the config key the name came from, quoted in the error message.
    """
    return _lookup("loss", name, LOSSES, where)


def get_metric(name: str, where: str = "train.metrics") -> LossFn | type:
    """Return the metric function registered under ``name``.

    Args:
        name: a key of METRICS, e.g. "dice_coef".
        where: the config key the name came from, quoted in the error message.
    """
    return _lookup("metric", name, METRICS, where)


def _check_task(kind: str, name: str, num_classes: int, where: str) -> None:
    if num_classes >= 2 and name in _BINARY_ONLY:
        raise SegMlopsError(
            f"{kind} {name!r} ({where}) is binary-only but num_classes={num_classes}; "
            f"use {_BINARY_ONLY[name]!r}"
        )
    if num_classes == 1 and name in _MULTICLASS_ONLY:
        raise SegMlopsError(
            f"{kind} {name!r} ({where}) needs num_classes >= 2 but num_classes=1; "
            f"use {_MULTICLASS_ONLY[name]!r}"
        )


def for_task(
    num_classes: int, loss: str = "auto", metrics: tuple[str, ...] = ()
) -> tuple[LossFn, list]:
    """Resolve the loss and metrics for a model with ``num_classes`` output channels.

    Args:
        num_classes: output channels; 1 means binary (sigmoid), >= 2 multiclass (softmax).
        loss: a key of LOSSES, or "auto" for the task's default.
        metrics: keys of METRICS; empty means the task's default list.

    Returns the loss function and fresh metrics (functions, or new instances of the split-level
    metric classes): give every compiled model its own list.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise SegMlopsError(
            f"num_classes must be an integer >= 1, got {num_classes!r}; use 1 for binary"
        )
    default_loss, default_metrics = _BINARY_DEFAULTS if num_classes == 1 else _MULTICLASS_DEFAULTS
    loss_name = default_loss if loss == "auto" else loss
    metric_names = tuple(metrics) or default_metrics

    loss_fn = get_loss(loss_name)
    _check_task("loss", loss_name, num_classes, "train.loss")
    metric_fns = []
    for name in metric_names:
        metric = get_metric(name)
        _check_task("metric", name, num_classes, "train.metrics")
        metric_fns.append(metric(num_classes) if isinstance(metric, type) else metric)
    return loss_fn, metric_fns


def metric_name(metric) -> str:
    """The log key of a metric (Keras logs `name`, and `val_name` on the valid split)."""
    return metric.name if isinstance(metric, keras.metrics.Metric) else metric.__name__


def monitor_mode(metric_name: str) -> str:
    """Return "min" for a loss-like log key and "max" for everything else.

    The monitored key is configured once (e.g. "val_dice_coef"); checkpointing,
    early stopping and pruning all use this to know which direction is better.

    Args:
        metric_name: a Keras log key such as "val_loss" or "val_dice_coef".
    """
    name = metric_name.removeprefix("val_")
    return "min" if name.endswith("loss") else "max"


def best_value(values, monitor: str) -> float:
    """The best of a history of `monitor` by its direction (min for losses, max otherwise),
    ignoring NaN (an epoch with nothing to score); NaN when no epoch has a value."""
    scored = [float(v) for v in values if v == v]  # NaN != NaN
    if not scored:
        return float("nan")
    return (min if monitor_mode(monitor) == "min" else max)(scored)
