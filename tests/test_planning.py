"""`seg-mlops plan`: the dataset profile on hand-drawn data, each planning rule on given inputs, the
timing-based epoch count with an injected step time, and the recipe keys in the trainer (cosine
schedule with warm-up, wall-clock budget, foreground-class dice loss)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pytest
from click.testing import CliRunner

from seg_mlops import config, data, dataset_profile, losses, planning, synthetic, tracking, train
from seg_mlops.cli import cli
from seg_mlops.epoch_clock import TimeBudget
from seg_mlops.errors import SegMlopsError


def _write_pair(root: Path, split: str, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    for folder, content in (("images", image), ("masks", mask)):
        (root / split / folder).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / split / folder / f"{name}.png"), content)


@pytest.fixture(scope="module")
def drawn_root(tmp_path_factory) -> Path:
    """Known shapes: every 60x80 mask holds two disks of radius 5 and one horizontal strip 6 px
    tall and 40 px long, far apart; images are grey content stored as RGB."""
    root = tmp_path_factory.mktemp("drawn")
    for split, count in (("train", 4), ("valid", 2), ("test", 2)):
        for i in range(count):
            mask = np.zeros((60, 80), np.uint8)
            cv2.circle(mask, (15, 15), 5, 255, -1)
            cv2.circle(mask, (60, 15), 5, 255, -1)
            mask[40:46, 20:60] = 255
            image = np.dstack([mask // 2 + 40] * 3)
            _write_pair(root, split, f"{split}{i}", image, mask)
    return root


def test_profile_measures_sizes_channels_and_objects_of_hand_drawn_masks(drawn_root):
    cfg = config.load(None, [f"data.root={drawn_root}"])
    cfg, _ = data.prepare(cfg)
    shape = dataset_profile.describe(cfg)
    assert shape["described"] == 4
    assert shape["height"]["median"] == 60 and shape["width"]["median"] == 80
    assert shape["channels"] == {"3": 4} and shape["grey_content"] == 1.0
    found = shape["objects"]["1"]
    assert found["per_image"]["median"] == 3  # two disks and the strip
    disk = int((cv2.circle(np.zeros((20, 20), np.uint8), (10, 10), 5, 1, -1)).sum())  # 81 px as drawn
    assert found["area_px"]["min"] == disk and found["area_px"]["max"] == 240  # the strip: 6 x 40
    assert found["diameter_px"]["median"] == pytest.approx(math.sqrt(4 * disk / math.pi))  # ~10.2
    # the strip is 6 px thick (twice its largest distance to the background, 3), the disks ~10
    assert sorted(found["thickness_px"].values())[0] == pytest.approx(6.0, abs=0.1)
    # class pixels' mean distance to the background, (4 x mean - 2): between the strip's 6 and
    # two thirds of the disks' 11 px
    assert 5.5 < found["width_px"] < 8.5


def test_profile_reaches_the_runs_dataset_profile_json(tiny_cfg):
    import json

    result, _ = tracking.train(tiny_cfg("train.epochs=1", "train.epoch_infer_count=0"))
    written = json.loads((result.output_dir / "dataset_profile.json").read_text())
    assert written["splits"]["train"]["images"] == 8 and written["described"] == 8
    assert written["height"]["median"] == 48 and "1" in written["objects"]


# ----------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("size, expected", [(64, 4), (128, 5), (256, 6), (512, 6), (96, 5)])
def test_levels_leave_an_8_px_bridge(size, expected):
    assert planning.levels(size) == expected


@pytest.mark.parametrize("size, layers, train_images, expected", [
    (128, 5, 91, 8),  # Herlev at 128: memory allows far more, 8 is the cap
    (256, 6, 14, 2),  # Drosophila: 14 images want 8 steps per epoch, and 2 is the floor
    (128, 5, 40, 4),  # 40 images: 5 steps at batch 8 is too few, batch 4 gives 10
    (512, 6, 500, 2),  # 512 px: 792 MB of activations per sample, 2 fit 2 GiB
    (384, 6, 500, 4),  # 384 px: 446 MB per sample, 4 fit
])
def test_batch_size_from_memory_and_steps(size, layers, train_images, expected):
    assert planning.batch_size(size, layers, train_images) == expected


def test_activation_estimate_by_hand():
    # level 0 of a 64 px input with 16 filters: 64*64*16 values x 4 convs x 3 tensors x 4 bytes x 2
    assert planning.activation_bytes(64, 1) == 64 * 64 * 16 * 4 * 3 * 4 * 2


@pytest.mark.parametrize("classes, fractions, expected", [
    (1, [0.9, 0.1], "bce_dice_loss"),
    (1, [0.99, 0.01], "bce_dice_loss"),  # binary dice already is the foreground's
    (3, [0.5, 0.3, 0.2], "cce_dice_loss"),
    (5, [0.74, 0.17, 0.03, 0.05, 0.006], "cce_class_dice_loss"),  # Drosophila: glia and synapse are rare
])
def test_loss_from_task_and_imbalance(classes, fractions, expected):
    assert planning.loss(classes, fractions)[0] == expected


def _profile(median: int, p90: int, width_px: float, train: int = 91, valid: int = 18) -> dict:
    side = {"median": median, "p10": median, "p90": p90, "min": median, "max": p90}
    return {"height": side, "width": side, "objects": {"1": {"width_px": width_px}},
            "splits": {"train": {"images": train, "class_fractions": [0.8, 0.2]}, "valid": {"images": valid}}}


@pytest.mark.parametrize("median, p90, width, expected", [
    (512, 512, 153.0, (512, 64)),  # Herlev: big nuclei, every size down to 64 keeps them wide
    (256, 520, 22.0, (256, 192)),  # DSB2018: 8 px of a 22 px nucleus in 520 px images needs 189 -> 192
    (1024, 1024, 8.6, (512, 512)),  # Drosophila: membranes need 952 px, MAX_SIDE caps both
    (100, 100, 50.0, (96, 64)),
])
def test_size_range(median, p90, width, expected):
    assert planning.size_range(_profile(median, p90, width))[:2] == expected


def test_size_range_without_objects_in_the_sample():
    prof = _profile(256, 256, float("nan"))
    assert planning.size_range(prof)[:2] == (256, planning.MIN_SIDE)


def test_epochs_from_an_injected_step_time():
    # 10 min x 0.9 = 540 s, minus tracing twice (10 s), over 12 x 0.1 + 3 x 0.1 x 0.35 + 1.5 s per epoch
    assert planning.epochs(0.1, 5.0, 12, 3, 10) == int(530 // (1.2 + 0.105 + 1.5)) == 188
    assert planning.epochs(10.0, 5.0, 100, 10, 1) == 1  # never 0


def test_input_size_halves_until_the_budget_allows_enough_steps():
    # 0.5 s per image at 512 px, 4x less per halving; 91 train and 18 valid images, 10 minutes
    calls = []

    def timer(size, depth, batch):
        calls.append((size, depth, batch))
        return batch * 0.5 * (size / 512) ** 2, 2.0

    fit = planning.input_size(_profile(512, 512, 153.0), 10, timer)
    # 512 px, batch 2 (memory): 1 s steps, 46 a epoch -> 10 epochs, 460 steps: too few
    # 256 px, batch 8: 1 s steps, 12 a epoch -> 36 epochs, 432 steps: too few
    # 128 px, batch 8: 0.25 s steps -> (540 - 4) // (3 + 3 x 0.25 x 0.35 + 1.5) = 112 epochs, 1344 steps
    assert calls == [(512, 6, 2), (256, 6, 8), (128, 5, 8)]
    assert (fit["size"], fit["levels"], fit["batch"], fit["epochs"]) == (128, 5, 8, 112)
    assert planning.input_size(_profile(512, 512, 153.0), 10, timer) == fit  # deterministic given the timings
    # objects that need 512 px keep it, whatever the budget allows
    assert planning.input_size(_profile(512, 512, 8.0), 10, timer)["size"] == 512


def test_plan_writes_a_valid_commented_config(drawn_root, tmp_path):
    entries, prof = planning.make_plan(drawn_root, 2, time_step=lambda s, d, b: (0.05, 1.0))
    text = planning.to_yaml(entries, "planned for a test")
    path = tmp_path / "planned.yaml"
    path.write_text(text)
    cfg = config.load(path)
    assert (cfg.model.image_height, cfg.model.num_layers, cfg.model.batch_norm) == (64, 4, True)
    assert cfg.train.lr_schedule == "cosine" and cfg.train.loss == "bce_dice_loss"
    # 4 train images, batch 2: 2 steps of 0.05 s + 1 valid batch + 1.5 s per epoch in 108 s - 2 s
    assert cfg.train.epochs == int((2 * 60 * 0.9 - 2.0) // (2 * 0.05 + 0.05 * 0.35 + 1.5)) == 65
    assert cfg.train.warmup_epochs == 3 and cfg.train.max_minutes == 2.0
    assert cfg.tune.space["train.learning_rate"] == {"low": 0.000333, "high": 0.003, "log": True}
    lines = text.splitlines()
    for i, line in enumerate(lines):  # every value has its reason on the line above
        if ":" in line and not line.lstrip().startswith("#") and not line.endswith(":") and line.startswith("  ") \
                and not line.startswith("    "):
            assert lines[i - 1].lstrip().startswith("#"), line
    assert prof["splits"]["train"]["images"] == 4


def test_detect_classes_from_classes_csv_and_from_colours(tmp_path, multiclass_root, binary_root):
    (tmp_path / "classes.csv").write_text("id,name,r,g,b\n1,a,255,0,0\n0,bg,0,0,0\n2,b,0,255,0\n")
    assert planning.detect_classes(tmp_path) == {"model.num_classes": 3,
                                                 "data.rgb_map": [[0, 0, 0], [255, 0, 0], [0, 255, 0]]}
    found = planning.detect_classes(multiclass_root)
    assert found["model.num_classes"] == 3
    assert sorted(map(tuple, found["data.rgb_map"])) == sorted(map(tuple, synthetic.rgb_map(3)))
    assert planning.detect_classes(binary_root) == {"model.num_classes": 1}
    with pytest.raises(SegMlopsError, match="folder not found: .*nothing/train/masks"):
        planning.detect_classes(tmp_path / "nothing")


def test_plan_command_prints_a_config_that_trains(binary_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["plan", str(binary_root), "--budget-minutes", "1"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "planned.yaml"
    path.write_text(result.stdout)
    cfg = config.load(path, ["train.epochs=3", "train.warmup_epochs=1", f"train.output_dir={tmp_path / 'out'}",
                             "train.max_minutes=0",  # no wall clock in a test
                             "train.epoch_infer_count=0"])
    assert cfg.model.image_height == planning.MIN_SIDE  # 48 px images: the smallest planned side
    _, run_id = tracking.train(cfg)
    lr = [m.value for m in mlflow.MlflowClient().get_metric_history(run_id, "lr")]
    # warm-up from 0 over epoch 0, the peak at epoch 1's start, half of it halfway through the cosine
    assert lr == pytest.approx([0.0, 1e-3, 5e-4], abs=1e-9)


# ----------------------------------------------------------------------------- the recipe


def test_cosine_schedule_is_a_function_of_the_step():
    cfg = config.load(None, ["train.lr_schedule=cosine", "train.epochs=5", "train.warmup_epochs=1",
                             "train.learning_rate=0.01"])
    schedule = train.learning_rate(cfg, 10)
    values = [float(schedule(step)) for step in (0, 5, 10, 30, 50)]
    # 10 warm-up steps to 0.01, then 40 steps of cosine: halfway (step 30) 0.005, the end 0
    assert values == pytest.approx([0.0, 0.005, 0.01, 0.005, 0.0], abs=1e-7)
    assert train.learning_rate(config.load(None, ["train.learning_rate=0.01"]), 10) == 0.01


def test_schedule_keys_are_checked():
    with pytest.raises(SegMlopsError, match="train.warmup_epochs=5 leaves no epoch"):
        config.load(None, ["train.lr_schedule=cosine", "train.epochs=5", "train.warmup_epochs=5"])
    with pytest.raises(SegMlopsError, match="needs train.lr_schedule: cosine"):
        config.load(None, ["train.warmup_epochs=2"])


class _Model:
    stop_training = False


def test_time_budget_stops_before_the_epoch_that_would_overrun():
    now = [0.0]
    budget = TimeBudget(1.0, clock=lambda: now[0])
    budget.set_model(_Model())
    budget.on_train_begin()
    for epoch in range(20):
        budget.on_epoch_begin(epoch)
        now[0] += 25.0 if epoch == 0 else 5.0  # the first epoch traces
        budget.on_epoch_end(epoch)
        if budget.model.stop_training:
            break
    # after epoch 8 (index 7): 25 + 7 x 5 = 60 s; the 25 s first epoch is not the yardstick,
    # else it would have stopped after epoch 1 (25 + 25 < 60, 30 + 25 < 60, 35 + 25 = 60, 40 + 25 > 60)
    assert budget.stopped_epoch == 7 and now[0] == 60.0


def test_class_dice_loss_by_hand():
    # 1 image, 2 pixels, 3 classes: pixel 0 is class 1, pixel 1 is class 2 (no background)
    y = np.array([[[[0, 1, 0], [0, 0, 1]]]], np.float32)
    p = np.array([[[[0.2, 0.6, 0.2], [0.1, 0.1, 0.8]]]], np.float32)
    cce = -(math.log(0.6) + math.log(0.8)) / 2
    dice1 = (2 * 0.6 + 1) / (1 + 0.7 + 1)  # class 1: truth 1, predicted mass 0.6 + 0.1
    dice2 = (2 * 0.8 + 1) / (1 + 1.0 + 1)
    expected = 0.5 * (cce + 1 - (dice1 + dice2) / 2)
    assert float(losses.cce_class_dice_loss(y, p)) == pytest.approx(expected, rel=1e-5)
    assert losses.get_loss("cce_class_dice_loss") is losses.cce_class_dice_loss
    with pytest.raises(SegMlopsError, match="needs num_classes >= 2"):
        losses.for_task(1, "cce_class_dice_loss")
