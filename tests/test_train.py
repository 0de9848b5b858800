"""Training end to end on a tiny synthetic set: checkpoint, history files, epoch panels, LR
reducer, seeding and the output-folder guard."""

from __future__ import annotations

import csv
import dataclasses

import cv2
import keras
import numpy as np
import pytest

from seg_mlops import resume, train
from seg_mlops.callbacks import HistoryWriter
from seg_mlops.errors import SegMlopsError
from seg_mlops.infer import load_model


@pytest.fixture
def trained(tiny_cfg):
    cfg = tiny_cfg("train.epochs=3")
    return cfg, train.train(cfg, verbose=0)


def test_history_checkpoint_and_csvs(trained):
    cfg, result = trained
    assert len(result.history["loss"]) == 3
    assert result.model_path.name == "best_model.keras" and result.model_path.exists()
    # The checkpoint holds the best epoch on train.monitor (val_dice_coef, max); the returned
    # model has the same weights restored.
    best = int(np.argmax(result.history["val_dice_coef"]))
    reloaded = load_model(result.model_path)
    x = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(reloaded.predict_on_batch(x), result.model.predict_on_batch(x), atol=1e-5)
    assert 0 <= best < 3

    with open(result.output_dir / "train_losses.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epoch", "loss", "val_loss"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2"]
    assert [float(r[2]) for r in rows[1:]] == pytest.approx(result.history["val_loss"], abs=6e-5)
    with open(result.output_dir / "train_metrics.csv") as f:
        header = next(csv.reader(f))
    assert header == ["epoch", "dice_coef", "val_dice_coef", "iou_coef", "val_iou_coef",
                      "image_dice", "val_image_dice"]
    for name in ("train_losses.png", "train_metrics.png"):
        assert cv2.imread(str(result.output_dir / name)) is not None
    assert (result.output_dir / "config.yaml").read_text().startswith("experiment:")


def test_epoch_inference_panels(trained):
    cfg, result = trained
    panels = sorted((result.output_dir / "epoch_infer").glob("*.png"))
    # 2 fixed images (the first two valid pairs by name) x 3 epochs
    assert [p.name for p in panels] == [f"epoch_{e:03d}_cell_{i:04d}.png" for e in (1, 2, 3) for i in (0, 1)]
    image = cv2.imread(str(panels[0]))
    assert image.shape == (32, 3 * 32 + 4, 3)  # input | truth | prediction with 2-px gaps
    # The ground-truth third is a binary mask: only black and white pixels.
    truth = image[:, 34:66]
    assert set(np.unique(truth)) <= {0, 255} and truth.max() == 255
    # The callback exposes the latest panels for other callbacks (MLflow logs them).
    assert result.epoch_inference.epoch == 3
    assert sorted(result.epoch_inference.panels) == ["cell_0000", "cell_0001"]


def test_output_folder_is_not_reused_without_overwrite(trained, tiny_cfg):
    cfg, result = trained
    before = result.model_path.stat().st_mtime_ns
    with pytest.raises(SegMlopsError, match="already holds a trained model.*--overwrite"):
        train.train(cfg, verbose=0)
    assert result.model_path.stat().st_mtime_ns == before  # nothing touched


def test_lr_reducer_uses_configured_factor_and_patience(tiny_cfg):
    # A learning rate too small to move any metric by min_delta: epoch 1 sets the best, epochs 2-3
    # don't improve, so the LR halves after epoch 3 and again after epoch 5 (the logged value is
    # the LR an epoch ran with). The reference's FLEX trainer silently ignored the patience.
    cfg = tiny_cfg("train.epochs=5", "train.learning_rate=1e-9", "train.reducer_factor=0.5",
                   "train.reducer_patience=2", "train.patience=0", "train.epoch_infer_count=0",
                   "train.monitor=val_loss")
    result = train.train(cfg, verbose=0)
    assert result.history["lr"] == pytest.approx([1e-9, 1e-9, 1e-9, 5e-10, 5e-10], rel=1e-4)
    assert "learning_rate" not in result.history  # one name for the LR (epoch_clock)
    # one clock: the resume state's rows hold the very values the History got
    rows = resume.load_state(cfg.output_dir).rows
    assert [r["lr"] for r in rows] == result.history["lr"]
    assert [r["epoch_seconds"] for r in rows] == result.history["epoch_seconds"]
    # the reference's CSV columns, without lr or epoch_seconds
    assert (cfg.output_dir / "train_metrics.csv").read_text().splitlines()[0] == \
        "epoch,dice_coef,val_dice_coef,iou_coef,val_iou_coef,image_dice,val_image_dice"


def test_same_seed_same_history(tiny_cfg, tmp_path):
    first = train.train(tiny_cfg("train.epoch_infer_count=0"), verbose=0).history
    keras.backend.clear_session()
    second = train.train(tiny_cfg("train.epoch_infer_count=0", f"train.output_dir={tmp_path / 'again'}"),
                         verbose=0).history
    np.testing.assert_allclose(first["loss"], second["loss"], rtol=1e-4)
    third = train.train(tiny_cfg("train.epoch_infer_count=0", "seed=1", f"train.output_dir={tmp_path / 'c'}"),
                        verbose=0).history
    assert not np.allclose(first["loss"], third["loss"], rtol=1e-4)


def test_monitor_must_be_logged(tiny_cfg):
    with pytest.raises(SegMlopsError, match="train.monitor='val_dice'.*val_dice_coef"):
        train.train(tiny_cfg("train.monitor=val_dice"), verbose=0)


def test_multiclass_trains_with_class_metrics(tiny_multiclass_cfg):
    result = train.train(tiny_multiclass_cfg("train.epochs=1", "train.monitor=val_class_dice"), verbose=0)
    assert {"class_dice", "val_class_dice", "class_dice_bg", "dice_coef"} <= set(result.history)
    assert result.model.output_shape == (None, 32, 32, 3)
    panel = cv2.cvtColor(cv2.imread(str(next((result.output_dir / "epoch_infer").glob("*.png")))),
                         cv2.COLOR_BGR2RGB)
    truth_colours = {tuple(c) for c in panel[:, 34:66].reshape(-1, 3)}
    assert truth_colours <= {(0, 0, 0), (0, 255, 0), (255, 0, 0)}


def test_progress_bar_only_in_a_terminal(monkeypatch):
    import io
    import sys

    from seg_mlops import train as train_mod

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    assert train_mod.progress_verbosity() == 1  # Keras' progress bar, redrawn in place
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert train_mod.progress_verbosity() == 2  # a log, CI, `mlflow run`: one line per epoch


def test_history_plots_redrawn_every_few_seconds_and_at_the_end(tmp_path):
    # Fit begins at 0 s and epochs end at 1, 3, 6, 11, 12 s on an injected clock, plots every
    # 10 s: the CSVs are rewritten every epoch, the plots at epoch 3 (11 - 0 >= 10) and 4 (the
    # last), never at the first (a short trial of a study draws them once).
    now = [0.0]
    writer = HistoryWriter(tmp_path, ["dice_coef"], plot_every=10.0, clock=lambda: now[0])
    writer.set_params({"epochs": 5})
    writer.on_train_begin()
    shown = []
    for epoch, end in enumerate([1.0, 3.0, 6.0, 11.0, 12.0]):
        now[0] = end
        writer.on_epoch_end(epoch, {"loss": 1.0 / (epoch + 1), "val_loss": 1.0, "dice_coef": 0.5,
                                    "val_dice_coef": 0.5})
        csv_rows = (tmp_path / "train_losses.csv").read_text().splitlines()
        assert len(csv_rows) == 1 + epoch + 1
        shown.append(writer.plotted)
    assert shown == [0, 0, 0, 4, 5]
    assert cv2.imread(str(tmp_path / "train_metrics.png")) is not None

    # Fit stopped early by a callback after this writer (e.g. a pruner): the plots catch up once.
    early = HistoryWriter(tmp_path / "early", ["dice_coef"], clock=lambda: 0.0)
    early.set_params({"epochs": 5})
    early.on_train_begin()
    for epoch in range(2):
        early.on_epoch_end(epoch, {"loss": 1.0, "val_loss": 1.0})
    assert early.plotted == 0 and not (tmp_path / "early" / "train_losses.png").exists()
    early.on_train_end()
    assert early.plotted == 2


@pytest.mark.parametrize("classes", [1, 3])
def test_first_train_step_is_traced_once(classes):
    # compile_model creates the optimizer's and metrics' variables up front; were they created
    # inside the first step, TensorFlow would trace the step twice (about 1 s per training).
    from seg_mlops import config, model

    colours = {"data.rgb_map": [[0, 0, 0], [255, 0, 0], [0, 255, 0]]} if classes > 1 else {}
    cfg = config.load(None, {"model.image_height": 32, "model.image_width": 32, "model.num_layers": 2,
                             "model.base_filters": 4, "model.num_classes": classes, **colours})
    net = model.build_unet(**dataclasses.asdict(cfg.model))
    train.compile_model(net, cfg)
    assert net.optimizer.built
    traced = []
    step = net.train_step
    net.train_step = lambda batch: traced.append(1) or step(batch)
    images = np.zeros((2, 32, 32, 3), "float32")
    masks = np.zeros((2, 32, 32, classes), "float32")
    masks[..., 0] = 1.0
    for _ in range(2):
        net.train_on_batch(images, masks)
    assert len(traced) == 1
