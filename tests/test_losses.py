"""Losses and metrics on tiny arrays whose expected values are worked out by hand."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from seg_mlops import losses
from seg_mlops.errors import SegMlopsError


def t(array) -> object:
    """A float32 tensor of shape (batch, H, W, C) from nested lists."""
    return ops.convert_to_tensor(np.asarray(array, dtype="float32"))


def mask(rows) -> object:
    """One 2-D binary mask -> a (1, H, W, 1) tensor."""
    return t(np.asarray(rows)[None, :, :, None])


def one_hot(classes, num_classes: int) -> object:
    """A 2-D class-index map -> a (1, H, W, C) one-hot tensor."""
    return t(np.eye(num_classes)[np.asarray(classes)][None])


# Truth has 3 ones (top row); prediction has 2 ones, 1 of them on the top row.
TRUTH_3X3 = mask([[1, 1, 1], [0, 0, 0], [0, 0, 0]])
PRED_3X3 = mask([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
EMPTY = mask(np.zeros((3, 3)))


def test_dice_coef_3x3_by_hand():
    # sum(y*p) = 1, sum(y) = 3, sum(p) = 2 -> (2*1 + 1) / (3 + 2 + 1) = 3/6
    assert float(losses.dice_coef(TRUTH_3X3, PRED_3X3)) == pytest.approx(0.5)
    assert float(losses.dice_loss(TRUTH_3X3, PRED_3X3)) == pytest.approx(1 - 0.5)


def test_iou_coef_3x3_by_hand():
    # intersection 1, union 3 + 2 - 1 = 4 -> (1 + 1) / (4 + 1) = 2/5
    assert float(losses.iou_coef(TRUTH_3X3, PRED_3X3)) == pytest.approx(0.4)
    assert float(losses.iou_loss(TRUTH_3X3, PRED_3X3)) == pytest.approx(0.6)


@pytest.mark.parametrize("metric", [losses.dice_coef, losses.iou_coef])
def test_smoothed_batch_metrics_score_empty_empty_one(metric):
    # the reference's formulas (kept for parity): every sum is 0 -> (0 + 1) / (0 + 1) = 1; the
    # unsmoothed reference IoU gave NaN here
    assert float(metric(EMPTY, EMPTY)) == pytest.approx(1.0)


def score(metric_class, num_classes: int, *batches) -> float:
    """A split-level metric fed batch by batch, as Keras does during fit and evaluate."""
    metric = metric_class(num_classes)
    for truth, pred in batches:
        metric.update_state(truth, pred)
    return float(metric.result())


@pytest.mark.parametrize("metric_class", [losses.ImageDice, losses.ClassDice])
def test_split_metrics_have_nothing_to_score_on_empty_truth(metric_class):
    # The empty rule: no truth, nothing to score -> NaN (never a made-up 1 or 0)
    assert math.isnan(score(metric_class, 1, (EMPTY, EMPTY)))


def test_image_dice_skips_empty_truth_and_ignores_batching():
    # image A: all 4 pixels true, all 4 predicted; image B: empty truth, 1 false positive;
    # image C: 2 true pixels, 1 of them predicted
    a_t, a_p = np.ones((2, 2)), np.ones((2, 2))
    b_t, b_p = np.zeros((2, 2)), np.array([[1, 0], [0, 0]])
    c_t, c_p = np.array([[1, 1], [0, 0]]), np.array([[1, 0], [0, 0]])
    images = lambda *xs: t(np.stack(xs)[..., None])  # noqa: E731
    # batch-global (the reference's): sum(y*p) = 4, sum(y) = 4, sum(p) = 5 -> 9/10 for A+B
    assert float(losses.dice_coef(images(a_t, b_t), images(a_p, b_p))) == pytest.approx(0.9)
    # per image: A = 1, B skipped (empty truth), C = 2*1/(2+1) = 2/3 -> mean 5/6, however batched
    expected = (1 + 2 / 3) / 2
    assert score(losses.ImageDice, 1, (images(a_t, b_t, c_t), images(a_p, b_p, c_p))) == pytest.approx(expected)
    assert score(losses.ImageDice, 1, (images(a_t, b_t), images(a_p, b_p)),
                 (images(c_t), images(c_p))) == pytest.approx(expected)


def test_bce_dice_loss_by_hand():
    truth = t([[[[1.0], [0.0]]]])  # (1, 1, 2, 1)
    pred = t([[[[0.8], [0.4]]]])
    # bce: mean(-ln 0.8, -ln(1 - 0.4)) = (0.22314 + 0.51083) / 2 = 0.36699
    bce = (-math.log(0.8) - math.log(0.6)) / 2
    # dice: sum(y*p) = 0.8, sum(y) = 1, sum(p) = 1.2 -> (1.6 + 1) / (1 + 1.2 + 1) = 0.8125
    dice = (2 * 0.8 + 1) / (1 + 1.2 + 1)
    # 0.5 * (0.36699 + 0.1875) = 0.27724
    expected = 0.5 * (bce + (1 - dice))
    assert float(losses.bce_dice_loss(truth, pred)) == pytest.approx(expected, rel=1e-5)


# 3 classes on a 2x2 image: truth [[0, 1], [2, 2]], prediction [[0, 1], [1, 1]].
TRUTH_3C = one_hot([[0, 1], [2, 2]], 3)
PRED_3C = one_hot([[0, 1], [1, 1]], 3)
# class 0: y = {(0,0)}, p = {(0,0)}              -> (2*1 + 1) / (1 + 1 + 1) = 1
# class 1: y = {(0,1)}, p = {(0,1),(1,0),(1,1)}  -> (2*1 + 1) / (1 + 3 + 1) = 0.6
# class 2: y = {(1,0),(1,1)}, p = {}             -> (0 + 1) / (2 + 0 + 1) = 1/3
PER_CLASS_3C = [1.0, 0.6, 1 / 3]


def test_per_class_dice_vector():
    got = ops.convert_to_numpy(losses.per_class_dice(TRUTH_3C, PRED_3C))
    np.testing.assert_allclose(got, PER_CLASS_3C, rtol=1e-6)


def test_class_dice_excludes_background_and_class_dice_bg_includes_it():
    # foreground only, unsmoothed over the split: class 1 2*1/(1+3) = 0.5, class 2 0/(2+0) = 0
    assert score(losses.ClassDice, 3, (TRUTH_3C, PRED_3C)) == pytest.approx((0.5 + 0) / 2)
    # all three (smoothed, batch-averaged, the reference's): (1 + 0.6 + 1/3) / 3 = 0.64444
    assert float(losses.class_dice_bg(TRUTH_3C, PRED_3C)) == pytest.approx((1 + 0.6 + 1 / 3) / 3)


def test_class_dice_skips_a_class_absent_from_the_truth():
    # truth has no class 2; the prediction puts class 2 on one pixel. class 1: y 3 px, p 2 px, 2
    # overlap -> 4/5; class 2 is absent from the truth: skipped, not scored 0 or 1.
    truth = one_hot([[0, 1], [1, 1]], 3)
    pred = one_hot([[2, 1], [1, 0]], 3)
    assert score(losses.ClassDice, 3, (truth, pred)) == pytest.approx(4 / 5)


def test_class_dice_with_one_channel_is_the_foreground_dice():
    # one channel has no background to drop: 2*1 / (3 + 2), unsmoothed
    assert score(losses.ClassDice, 1, (TRUTH_3X3, PRED_3X3)) == pytest.approx(0.4)


def test_cce_dice_loss_by_hand():
    truth = t([[[[0.0, 1.0]]]])  # one pixel of class 1
    pred = t([[[[0.3, 0.7]]]])
    cce = -math.log(0.7)  # 0.35667
    # class 0: (0 + 1) / (0 + 0.3 + 1) = 0.76923; class 1: (1.4 + 1) / (1 + 0.7 + 1) = 0.88889
    dice_bg = ((0 + 1) / (0 + 0.3 + 1) + (2 * 0.7 + 1) / (1 + 0.7 + 1)) / 2
    # 0.5 * (0.35667 + (1 - 0.82906)) = 0.26380
    expected = 0.5 * (cce + (1 - dice_bg))
    assert float(losses.cce_dice_loss(truth, pred)) == pytest.approx(expected, rel=1e-5)


def test_get_loss_unknown_name_suggests_closest():
    with pytest.raises(SegMlopsError) as err:
        losses.get_loss("bce_dice")
    message = str(err.value)
    assert "'bce_dice'" in message and "train.loss" in message
    assert "did you mean 'bce_dice_loss'?" in message
    assert "\n" not in message


def test_get_metric_unknown_name_suggests_closest():
    with pytest.raises(SegMlopsError, match="did you mean 'dice_coef'"):
        losses.get_metric("dice_cof")


def test_registries_resolve_known_names():
    assert losses.get_loss("dice_loss") is losses.dice_loss
    assert losses.get_metric("binary_accuracy") is keras.metrics.binary_accuracy
    assert "sparse_categorical_crossentropy" not in losses.LOSSES


def test_for_task_defaults():
    loss, metrics = losses.for_task(1)
    assert loss is losses.bce_dice_loss
    assert [losses.metric_name(m) for m in metrics] == ["dice_coef", "iou_coef", "image_dice"]
    assert metrics[2].num_classes == 1

    loss, metrics = losses.for_task(3)
    assert loss is keras.losses.categorical_crossentropy
    assert [losses.metric_name(m) for m in metrics] == ["dice_coef", "class_dice", "class_dice_bg"]
    assert isinstance(metrics[1], losses.ClassDice) and metrics[1].num_classes == 3


def test_for_task_explicit_names():
    loss, metrics = losses.for_task(1, loss="dice_loss", metrics=("class_dice",))
    assert loss is losses.dice_loss and [type(m) for m in metrics] == [losses.ClassDice]


@pytest.mark.parametrize(
    "num_classes, loss, metrics, suggestion",
    [
        (3, "binary_crossentropy", (), "categorical_crossentropy"),
        (3, "auto", ("binary_accuracy",), "categorical_accuracy"),
        (1, "categorical_crossentropy", (), "binary_crossentropy"),
        (1, "cce_dice_loss", (), "bce_dice_loss"),
    ],
)
def test_for_task_rejects_names_for_the_other_task(num_classes, loss, metrics, suggestion):
    with pytest.raises(SegMlopsError, match=f"use '{suggestion}'"):
        losses.for_task(num_classes, loss=loss, metrics=metrics)


def test_for_task_rejects_bad_num_classes():
    with pytest.raises(SegMlopsError, match="num_classes"):
        losses.for_task(0)


@pytest.mark.parametrize(
    "name, mode",
    [
        ("val_dice_coef", "max"),
        ("dice_coef", "max"),
        ("val_loss", "min"),
        ("loss", "min"),
        ("val_bce_dice_loss", "min"),
        ("val_image_dice", "max"),
    ],
)
def test_monitor_mode(name, mode):
    assert losses.monitor_mode(name) == mode


def test_saved_model_reloads_without_custom_objects(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 1))
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss=losses.bce_dice_loss,
                  metrics=[losses.dice_coef, losses.ImageDice(1)])

    x = np.random.default_rng(0).random((2, 4, 4, 1)).astype("float32")
    y = (x > 0.5).astype("float32")
    # one step builds the optimizer, so its state is saved and reloaded too
    history = model.fit(x, y, epochs=1, validation_data=(x, y), verbose=0)
    # the function and metric names become the log keys that monitors such as val_dice_coef rely on
    assert {"loss", "dice_coef", "image_dice", "val_dice_coef"} <= set(history.history)
    logs = model.evaluate(x, y, verbose=0, return_dict=True)

    path = tmp_path / "m.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)

    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )
    reloaded_logs = reloaded.evaluate(x, y, verbose=0, return_dict=True)
    for key in ("loss", "dice_coef", "image_dice"):
        assert reloaded_logs[key] == pytest.approx(logs[key], rel=1e-5)


def test_best_value_follows_the_monitor_direction_and_skips_nan():
    nan = float("nan")
    assert losses.best_value([0.2, nan, 0.7, 0.5], "val_dice_coef") == 0.7
    assert losses.best_value([0.9, 0.4, nan, 0.6], "val_loss") == 0.4
    assert losses.best_value([nan, 0.3], "val_bce_dice_loss") == 0.3
    assert math.isnan(losses.best_value([nan, nan], "val_dice_coef"))
