"""The five seed configs (configs/*.yaml): each loads with the seed's hyper-parameters, and each
trains one tiny epoch on the seed's own mini_test images (../shared/data/seed-mini-test/<seed>),
with epoch inference on them and per-class evaluation (Breast-Cancer-Cell: 3 classes)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from seg_mlops import config, evaluate, infer, train
from tests.conftest import REPO, numpy_scores, real_data

# config file -> (seed-mini-test folder, num_classes, rgb_map, base_kernels, learning_rate)
SEEDS = {
    "pap_smear": ("Pap-Smear", 1, (), 9, 1e-4),
    "tiled_cervical_cancer": ("Tiled-Cervical-Cancer", 1, (), 3, 2e-4),
    "tiled_edf_cervical_cytology": ("Tiled-EDF-Cervical-Cytology", 2, ((0, 0, 0), (255, 255, 255)), 9, 7e-5),
    "breast_cancer_cell": ("Breast-Cancer-Cell", 3, ((0, 0, 0), (0, 255, 0), (255, 0, 0)), 7, 7e-5),
    "cropped_pancreas": ("Cropped-Pancreas", 1, (), 9, 7e-5),
}


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_config_loads(name):
    folder, classes, rgb_map, kernels, lr = SEEDS[name]
    cfg = config.load(REPO / "configs" / f"{name}.yaml")
    assert cfg.experiment == name.replace("_", "-")
    assert (cfg.model.image_height, cfg.model.image_width, cfg.model.num_layers) == (512, 512, 8)
    assert (cfg.model.num_classes, cfg.data.rgb_map, cfg.model.base_kernels) == (classes, rgb_map, kernels)
    assert (cfg.train.learning_rate, cfg.train.batch_size, cfg.train.monitor) == (lr, 2, "val_loss")
    assert cfg.data.root == str(REPO / "dataset" / folder)
    assert cfg.train.epoch_infer_images == str(REPO / "dataset" / folder / "mini_test" / "images")
    assert {"model.base_kernels", "train.learning_rate"} <= set(cfg.tune.space)
    if name == "tiled_cervical_cancer":
        assert (cfg.tiled_infer.tile_size, cfg.tiled_infer.overlap, cfg.tiled_infer.epoch_infer_count) == (512, 128, 1)
        assert cfg.augment.hflip == 0.5 and cfg.augment.deformation_sigmas == (8.0,)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_trains_one_tiny_epoch_on_its_mini_test(name, tmp_path):
    folder, classes, _, _, _ = SEEDS[name]
    mini = real_data(f"seed-mini-test/{folder}")
    # the first 8 pairs (by name), linked into tmp: enough for one epoch, and the 3-class masks'
    # encoding (~1 s per 512 px mask on a loaded 2-core machine) stays affordable
    images, masks = tmp_path / "mini" / "images", tmp_path / "mini" / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for image in sorted((mini / "images").iterdir())[:8]:
        (images / image.name).symlink_to(image)
        mask = next((mini / "masks").glob(image.stem + ".*"))
        (masks / mask.name).symlink_to(mask)
    splits = [f"data.{split}_{kind}={tmp_path / 'mini' / kind}" for split in ("train", "valid", "test")
              for kind in ("images", "masks")]
    cfg = config.load(REPO / "configs" / f"{name}.yaml", [
        *splits, f"train.output_dir={tmp_path / 'out'}", "model.image_height=64", "model.image_width=64",
        "model.num_layers=3", "model.base_filters=4", "model.base_kernels=3", "model.dilation=1",
        "train.epochs=1", "train.batch_size=4", "train.learning_rate=0.01",
        f"train.epoch_infer_images={images}", f"train.epoch_infer_masks={masks}", "train.epoch_infer_count=2",
        f"tiled_infer.epoch_infer_images={images}", f"tiled_infer.epoch_infer_masks={masks}"])
    result = train.train(cfg, verbose=0)
    assert len(result.history["loss"]) == 1 and result.model_path.is_file()
    # epoch inference on the mini_test images: one panel per image for the one epoch
    panels = sorted(p.name for p in (result.output_dir / "epoch_infer").iterdir())
    assert len(panels) == 2, panels

    scores = evaluate.evaluate(result.model, cfg, tmp_path / "eval")
    names = ["foreground"] if classes == 1 else [f"class{i}" for i in range(classes)]
    expected = numpy_scores(result.model, result.cfg or cfg, "test")
    assert {k for k in scores if k.startswith("dice_")} == {k for k in expected if k.startswith("dice_")}
    for class_name in names:
        if f"dice_{class_name}" in expected:  # a class absent from the test truth is not scored
            assert scores[f"dice_{class_name}"] == pytest.approx(expected[f"dice_{class_name}"], abs=1e-6)
    assert not any(k.startswith("dice_class") for k in scores) if classes == 1 else \
        f"dice_class{classes}" not in scores
    rows = (tmp_path / "eval" / "per_image.csv").read_text().splitlines()
    assert len(rows) == 1 + 8  # header + every test image

    if name == "tiled_cervical_cancer":  # the seed's tiled inference on its 2048x1536 originals
        tiled = sorted(p.name for p in (result.output_dir / "epoch_tiled_infer").iterdir())
        assert tiled == [f"epoch_001_{sorted(images.iterdir())[0].stem}.png"]  # one image, one epoch
        two = tmp_path / "two"
        two.mkdir()
        for image in sorted(images.iterdir())[:2]:
            (two / image.name).symlink_to(image.resolve())
        written = infer.tiled_infer_folder(result.model, two, tmp_path / "tiled", cfg)
        for path in written:
            mask = np.asarray(Image.open(path))
            assert mask.shape == (1536, 2048) and set(np.unique(mask)) <= {0, 255}
        assert (cfg.tiled_infer.mode, cfg.tiled_infer.tile_size) == ("bitwise_blending", 512)
