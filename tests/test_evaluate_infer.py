"""Evaluation and inference against constant models, so every expected score is computed by hand."""

from __future__ import annotations

import csv
import math

import cv2
import keras
import numpy as np
import pytest
from PIL import Image

from seg_mlops import config, evaluate, infer


def constant_model(size: int, bias: list[float]) -> keras.Model:
    """Ignores its input: sigmoid(bias) for one channel, softmax(bias) for several."""
    inputs = keras.Input((size, size, 3))
    act = "sigmoid" if len(bias) == 1 else "softmax"
    outputs = keras.layers.Conv2D(len(bias), 1, activation=act, kernel_initializer="zeros",
                                  bias_initializer=keras.initializers.Constant(bias))(inputs)
    return keras.Model(inputs, outputs)


def write_split(root, split, masks: dict[str, np.ndarray]):
    for kind in ("images", "masks"):
        (root / split / kind).mkdir(parents=True, exist_ok=True)
    for name, mask in masks.items():
        image = np.full(mask.shape[:2] + (3,), 100, np.uint8)
        cv2.imwrite(str(root / split / "images" / f"{name}.png"), image)
        cv2.imwrite(str(root / split / "masks" / f"{name}.png"),
                    mask if mask.ndim == 2 else cv2.cvtColor(mask, cv2.COLOR_RGB2BGR))


def test_binary_scores_by_hand(tmp_path):
    a = np.zeros((8, 8), np.uint8)
    a[2:6, 2:6] = 255  # 16 foreground pixels
    write_split(tmp_path, "test", {"a": a, "b": np.zeros((8, 8), np.uint8)})
    cfg = config.load(None, [f"data.root={tmp_path}", "model.image_height=8", "model.image_width=8",
                             "model.num_layers=1"])  # 8 px holds 1 level of a UNet with default depth
    results = evaluate.evaluate(constant_model(8, [10.0]), cfg, tmp_path / "eval")

    # Hard masks: everything predicted foreground (64 px per image).
    # a: dice 2*16/(16+64) = 0.4, iou 16/64 = 0.25;  b (empty truth): nothing to score, skipped,
    # and counted as an empty image with false positives.
    assert results["mean_image_dice"] == pytest.approx(0.4)
    assert results["mean_image_iou"] == pytest.approx(0.25)
    assert (results["empty_truth_images"], results["false_positive_images"]) == (1, 1)
    # Whole split: 2*16/(16+128) and 16/(16+128-16).
    assert results["dice_foreground"] == pytest.approx(32 / 144)
    assert results["iou_foreground"] == pytest.approx(16 / 128)
    # Soft, batch-global dice_coef on p = sigmoid(10) everywhere: (2*16p + 1)/(16 + 128p + 1).
    p = 1 / (1 + math.exp(-10))
    assert results["dice_coef"] == pytest.approx((32 * p + 1) / (17 + 128 * p), rel=1e-5)
    # Soft image_dice: a alone (b's truth is empty): 2*16p / (16 + 64p).
    assert results["image_dice"] == pytest.approx(32 * p / (16 + 64 * p), rel=1e-5)

    with open(tmp_path / "eval" / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["image"], r["dice"], r["iou"]) for r in rows] == [("a.png", "0.4000", "0.2500"),
                                                                 ("b.png", "", "")]
    lines = (tmp_path / "eval" / "evaluation.csv").read_text().splitlines()
    assert lines[0] == "name,score" and "mean_image_dice,0.4000" in lines


def test_multiclass_scores_by_hand(tmp_path):
    rgb_map = [[0, 0, 0], [0, 255, 0], [255, 0, 0]]
    a = np.zeros((8, 8, 3), np.uint8)
    a[:, :4] = (0, 255, 0)  # 32 px class 1
    a[:4, 4:] = (255, 0, 0)  # 16 px class 2; the remaining 16 px are background
    write_split(tmp_path, "test", {"a": a, "b": np.zeros((8, 8, 3), np.uint8)})
    cfg = config.load(None, [f"data.root={tmp_path}", "model.image_height=8", "model.image_width=8",
                             "model.num_layers=1", "model.num_classes=3", f"data.rgb_map={rgb_map}"])
    results = evaluate.evaluate(constant_model(8, [0.0, 10.0, 0.0]), cfg, tmp_path / "eval")

    # Every pixel predicted class 1. Whole split: class0 truth 80, pred 0 -> 0;
    # class1 truth 32, pred 128, overlap 32 -> 64/160; class2 truth 16, pred 0 -> 0.
    assert [results[f"dice_class{c}"] for c in range(3)] == pytest.approx([0.0, 0.4, 0.0])
    # Per image over the foreground classes its truth holds: a -> (64/96 + 0)/2; b holds none:
    # skipped (the old rule scored its empty class 2 as a perfect 1).
    assert results["mean_image_dice"] == pytest.approx((64 / 96) / 2)
    assert results["empty_truth_images"] == 1
    # Soft class_dice: per foreground class over the split, q = softmax of (0, 10, 0) for class 1:
    # class1 2*32q/(32 + 128q); class2 2*16r/(16 + 128r) with r the class-2 probability.
    q = math.exp(10) / (math.exp(10) + 2)
    r = 1 / (math.exp(10) + 2)
    assert results["class_dice"] == pytest.approx((64 * q / (32 + 128 * q) + 32 * r / (16 + 128 * r)) / 2, rel=1e-4)
    assert {"class_dice", "class_dice_bg", "dice_coef", "loss"} <= set(results)


def test_absent_class_is_not_reported(tmp_path, capsys):
    rgb_map = [[0, 0, 0], [0, 255, 0], [255, 0, 0]]
    a = np.zeros((8, 8, 3), np.uint8)
    a[:, :4] = (0, 255, 0)  # class 2 appears in no test mask
    write_split(tmp_path, "test", {"a": a})
    cfg = config.load(None, [f"data.root={tmp_path}", "model.image_height=8", "model.image_width=8",
                             "model.num_layers=1", "model.num_classes=3", f"data.rgb_map={rgb_map}"])
    results = evaluate.evaluate(constant_model(8, [0.0, 10.0, 0.0]), cfg, tmp_path / "eval")
    # The old rule reported dice_class2 = 1.0 (empty truth, empty prediction) for a class never seen.
    assert "dice_class2" not in results and "iou_class2" not in results
    assert results["dice_class1"] == pytest.approx(64 / 96)
    assert "class2 is absent from the test split's truth" in capsys.readouterr().out


def test_test_metrics_equal_keras_validation_metrics(tiny_cfg, tmp_path):
    """val_* (Keras during fit) and test_* (evaluate) are one computation: on the same 5 images at
    batch 4 they agree. On the old main evaluate weighted each batch by its size while Keras
    averaged batches equally (0.160 vs 0.112 was seen)."""
    from seg_mlops import synthetic, train

    root = synthetic.make_dataset(tmp_path / "data", classes=1, size=48, counts=(8, 5, 1), seed=3)
    cfg = tiny_cfg(f"data.root={root}", f"data.test_images={root / 'valid' / 'images'}",
                   f"data.test_masks={root / 'valid' / 'masks'}", "train.epochs=1", "train.patience=0",
                   "train.epoch_infer_count=0")
    result = train.train(cfg, verbose=0)
    results = evaluate.evaluate(result.model, result.cfg, tmp_path / "eval")
    for name in ("loss", "dice_coef", "iou_coef", "image_dice"):
        assert results[name] == pytest.approx(result.history[f"val_{name}"][-1], rel=1e-4, abs=1e-6), name



def test_infer_writes_masks_at_original_size(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "wide.png"), np.full((12, 20, 3), 255, np.uint8))
    cv2.imwrite(str(images / "small.jpg"), np.full((8, 8, 3), 255, np.uint8))
    written = infer.infer_folder(constant_model(8, [10.0]), images, tmp_path / "out",
                                 palette=[(0, 0, 0), (0, 255, 0)], colorize_masks=True, overlays=True,
                                 alpha=0.4)
    assert [p.name for p in written] == ["small.png", "wide.png"]
    mask = Image.open(tmp_path / "out" / "wide.png")
    assert mask.mode == "L" and mask.size == (20, 12)
    assert set(np.unique(np.asarray(mask))) == {255}
    colour = cv2.imread(str(tmp_path / "out" / "colorized" / "wide.png"))[..., ::-1]
    assert (colour == (0, 255, 0)).all()
    # White image + green at alpha 0.4: (0.6*255, 255, 0.6*255) = 153 -- no uint8 wrap-around.
    blend = cv2.imread(str(tmp_path / "out" / "overlay" / "wide.png"))[..., ::-1]
    assert (blend == (153, 255, 153)).all()


def test_infer_multiclass_palette_png(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "x.png"), np.zeros((16, 10, 3), np.uint8))
    palette = [(0, 0, 0), (0, 255, 0), (255, 0, 0)]
    infer.infer_folder(constant_model(8, [0.0, 0.0, 10.0]), images, tmp_path / "out", palette=palette)
    mask = Image.open(tmp_path / "out" / "x.png")
    # Pixel values are class ids; the palette is the rgb_map, so viewers show the colours.
    assert mask.mode == "P" and mask.size == (10, 16)
    assert set(np.unique(np.asarray(mask))) == {2}
    assert mask.getpalette()[:9] == [0, 0, 0, 0, 255, 0, 255, 0, 0]
    assert np.asarray(mask.convert("RGB"))[0, 0].tolist() == [255, 0, 0]


def test_binary_threshold_and_overlay_by_hand():
    probs = np.array([[[0.2], [0.5]], [[0.7], [0.49]]])
    assert infer.to_labels(probs, 0.5).tolist() == [[0, 1], [1, 0]]
    assert infer.to_labels(probs, 0.75).tolist() == [[0, 0], [0, 0]]
    image = np.array([[[250, 250, 250], [10, 20, 30]]], np.uint8)
    labels = np.array([[1, 0]], np.uint8)
    # Foreground pixel: 0.5*250 + 0.5*(255, 0, 0) = (252.5, 125, 125) -> rounded; background kept.
    assert infer.overlay(image, labels, [(0, 0, 0), (255, 0, 0)], 0.5).tolist() == \
        [[[253, 125, 125], [10, 20, 30]]]


def test_load_model_errors(tmp_path):
    from seg_mlops.errors import SegMlopsError

    with pytest.raises(SegMlopsError, match="model not found: .*nope.keras"):
        infer.load_model(tmp_path / "nope.keras")
    (tmp_path / "bad.keras").write_text("not a model")
    with pytest.raises(SegMlopsError, match="cannot load model .*bad.keras"):
        infer.load_model(tmp_path / "bad.keras")


def test_composite_puts_the_panels_in_one_picture_sized_for_the_ui_card():
    from seg_mlops.callbacks import MIN_ASPECT, composite

    # 30x100 panels (input | truth | prediction of 30 px images): the fewest columns that make the
    # picture at least 3x wider than tall. Two stacked would be 100x64 (1.56): side by side
    # (204x30, 6.8); three or four go two by two (204x64, 3.19).
    assert MIN_ASPECT == 3.0
    panels = [np.full((30, 100, 3), 10 * (i + 1), np.uint8) for i in range(4)]
    assert composite(panels[:2]).shape == (30, 2 * 100 + 4, 3)
    three = composite(panels[:3])
    assert three.shape == (2 * 30 + 4, 2 * 100 + 4, 3)
    assert [int(three[y, x, 0]) for y, x in ((0, 0), (0, 104), (34, 0), (34, 104))] == [10, 20, 30, 128]
    assert int(three[31, 50, 0]) == 128 and int(three[10, 101, 0]) == 128  # the grey gaps
    assert composite(panels).shape == (2 * 30 + 4, 2 * 100 + 4, 3)
    # Tall panels never reach 3: the widest grid, side by side.
    assert composite([np.zeros((100, 30, 3), np.uint8)] * 2).shape == (100, 2 * 30 + 4, 3)
    # A smaller panel (a tiled image of another size) is padded grey.
    mixed = composite([np.zeros((30, 100, 3), np.uint8), np.zeros((20, 60, 3), np.uint8)])
    assert mixed.shape == (30, 204, 3) and int(mixed[25, 130, 0]) == 128 and int(mixed[10, 130, 0]) == 0
