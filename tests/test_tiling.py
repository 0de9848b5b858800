"""Tiled inference and dataset tiling: grid geometry, stitching with models whose output is known
(hand-checked values), the make-tiles and tiled-infer commands, the tiled epoch panels in MLflow,
and the 2048x1536 Tiled-Cervical-Cancer images."""

from __future__ import annotations

import subprocess

import cv2
import keras
import mlflow
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from seg_mlops import infer, tiling, tracking
from tests.test_cli import run
from seg_mlops.config import TiledInferConfig
from seg_mlops.errors import SegMlopsError
from seg_mlops.model import build_unet
from tests.conftest import REPO, TINY, real_data
from tests.test_mlflow import MLFLOW, venv_env

M = 16  # model side of the hand-built models


def lambda_model(fn, channels: int = 1, size: int = M) -> keras.Model:
    inp = keras.Input((size, size, 3))
    return keras.Model(inp, keras.layers.Lambda(fn, output_shape=(size, size, channels))(inp))


def red_model() -> keras.Model:
    """Identity-like: probability = red channel / 255, so every tile predicts its own pixels."""
    return lambda_model(lambda x: x[..., :1] / 255.0)


def row_model() -> keras.Model:
    """Probability = the pixel's row inside the tile / M: shows which tile a pixel came from."""
    ramp = (np.arange(M, dtype=np.float32) / M)[None, :, None, None]
    return lambda_model(lambda x: keras.ops.zeros_like(x[..., :1]) + ramp)


def constant_model(value: float) -> keras.Model:
    return lambda_model(lambda x: keras.ops.zeros_like(x[..., :1]) + value)


def tiled(**kw) -> TiledInferConfig:
    return TiledInferConfig(**{"overlap": 2, "batch_size": 4, **kw})


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- geometry

def test_starts_hand_checked():
    assert tiling.starts(40, 16, 12) == [0, 12, 24]  # 24 + 16 = 40: the last regular tile fits
    assert tiling.starts(36, 16, 12) == [0, 12, 20]  # last shifted inward to 36 - 16
    assert tiling.starts(16, 16, 12) == [0] and tiling.starts(10, 16, 12) == [0]
    assert tiling.starts(41, 16, 12, "pad") == [0, 12, 24, 36]  # 36 + 16 = 52: pad to 52
    assert tiling.starts(40, 16, 12, "pad") == [0, 12, 24]
    assert tiling.starts(41, 16, 12, "skip") == [0, 12, 24]  # pixel 40 left out
    assert tiling.starts(10, 16, 12, "skip") == []
    # 2048 x 1536 in 512 px tiles with 64 px overlap (stride 384)
    assert tiling.starts(1536, 512, 384) == [0, 384, 768, 1024]
    assert tiling.starts(2048, 512, 384) == [0, 384, 768, 1152, 1536]
    # cores: boundaries half-way through each overlap
    assert tiling.core_bounds([0, 12, 24], 16, 40) == [0, 14, 26, 40]
    assert tiling.core_bounds([0, 12, 20], 16, 36) == [0, 14, 24, 36]


@pytest.mark.parametrize("h, w, tile, overlap", [(40, 37, (16, 16), 2), (100, 64, (32, 24), 5),
                                                 (16, 16, (16, 16), 0), (17, 50, (16, 16), 7)])
def test_grid_covers_every_pixel_and_cores_partition(h, w, tile, overlap):
    grid = tiling.overlap_grid(h, w, tile, overlap)
    covered = np.zeros((h, w), int)
    owned = np.zeros((h, w), int)
    for t in grid:
        assert (t.h, t.w) == tile and 0 <= t.y <= h - t.h and 0 <= t.x <= w - t.w  # full size, inside
        assert t.y <= t.cy0 < t.cy1 <= t.y + t.h and t.x <= t.cx0 < t.cx1 <= t.x + t.w  # core in tile
        covered[t.y:t.y + t.h, t.x:t.x + t.w] += 1
        owned[t.cy0:t.cy1, t.cx0:t.cx1] += 1
    assert covered.min() >= 1
    assert (owned == 1).all()
    assert [(t.row, t.col) for t in grid] == sorted((t.row, t.col) for t in grid)


def test_too_much_overlap_names_the_key():
    with pytest.raises(SegMlopsError, match=r"tiled_infer.overlap=8: must be below half the tile \(16 px\)"):
        tiling.overlap_grid(40, 40, (16, 16), 8)


def test_window_is_hann_with_a_floor():
    w = tiling.window(3, 3)  # np.hanning(5)[1:-1] = [0.5, 1, 0.5]
    np.testing.assert_allclose(w, [[0.25, 0.5, 0.25], [0.5, 1, 0.5], [0.25, 0.5, 0.25]])
    assert tiling.window(64, 64).min() == pytest.approx(1e-3)


# ----------------------------------------------------------------------------- stitching

@pytest.mark.parametrize("mode", ["average", "context"])
def test_identity_model_is_reproduced_exactly(mode):
    image = random_image(40, 37)
    probs = infer.tiled_probs(red_model(), image, overlap=2, mode=mode, batch_size=3)
    assert probs.shape == (40, 37, 1)
    np.testing.assert_allclose(probs[..., 0], image[..., 0] / 255.0, atol=1e-6)
    labels = infer.tiled_predict(red_model(), image, tiled(mode=mode), threshold=0.5)
    np.testing.assert_array_equal(labels, image[..., 0] >= 128)


def test_image_smaller_than_a_tile_is_padded_and_cropped_back():
    image = random_image(10, 7)
    probs = infer.tiled_probs(red_model(), image, overlap=2)
    np.testing.assert_allclose(probs[..., 0], image[..., 0] / 255.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["average", "context", "bitwise_blending"])
@pytest.mark.parametrize("tile_size", [0, 24])  # 24: tiles resized to the 16 px model and back
def test_constant_model_gives_a_constant_mask(mode, tile_size):
    image = random_image(50, 45)
    for value, expected in ((0.7, 1), (0.3, 0)):
        labels = infer.tiled_predict(constant_model(value), image, tiled(mode=mode, tile_size=tile_size))
        assert labels.shape == (50, 45) and (labels == expected).all()
    probs = infer.tiled_probs(constant_model(0.7), image, tile_size=tile_size, overlap=2)
    np.testing.assert_allclose(probs, 0.7, atol=1e-6)


def test_context_mode_pastes_each_tile_core():
    # 40 rows, 16 px tiles, overlap 2: tiles at rows 0, 12, 24; cores [0,14) [14,26) [26,40).
    probs = infer.tiled_probs(row_model(), random_image(40, 16), overlap=2, mode="context")[:, 0, 0]
    expected = [y / M for y in range(14)] + [(y - 12) / M for y in range(14, 26)] + \
               [(y - 24) / M for y in range(26, 40)]
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_average_mode_blends_with_the_window():
    # Row 13 is seen by tile 0 (its row 13) and tile 1 (its row 1); the columns lie in one tile.
    probs = infer.tiled_probs(row_model(), random_image(40, 16), overlap=2, mode="average")[:, 0, 0]
    hann = np.hanning(M + 2)[1:-1]
    assert probs[13] == pytest.approx((hann[13] * 13 / M + hann[1] * 1 / M) / (hann[13] + hann[1]), abs=1e-6)
    assert probs[5] == pytest.approx(5 / M, abs=1e-6)  # only tile 0 sees it
    assert probs[39] == pytest.approx(15 / M, abs=1e-6)  # only tile 2 (rows 24..39) sees it


def test_bitwise_blending_is_the_intersection():
    image = random_image(40, 37, seed=3)
    image[..., 0] = cv2.GaussianBlur(image[..., 0], (0, 0), 3)  # blobs larger than a pixel
    image[..., 0] = np.where(image[..., 0] > np.median(image[..., 0]), 200, 40)
    labels = infer.tiled_predict(red_model(), image, tiled(mode="bitwise_blending"))
    context = image[..., 0] >= 128  # the identity model's exact tiled mask
    # Whole image: resized to 16x16 (area), red/255, resized back bilinear, thresholded.
    small = cv2.resize(image, (M, M), interpolation=cv2.INTER_AREA)[..., 0].astype(np.float32) / 255
    whole = cv2.resize(small, (37, 40), interpolation=cv2.INTER_LINEAR) >= 0.5
    np.testing.assert_array_equal(labels, context & whole)
    assert 0 < labels.sum() < min(context.sum(), whole.sum())  # a real intersection


def test_multiclass_argmax():
    classes = np.random.default_rng(1).integers(0, 3, (40, 37))
    image = np.where(np.eye(3, dtype=bool)[classes], 220, 30).astype(np.uint8)
    model = lambda_model(lambda x: keras.ops.softmax(x / 255.0 * 20, axis=-1), channels=3)
    for mode in ("average", "context"):
        probs = infer.tiled_probs(model, image, overlap=2, mode=mode)
        assert probs.shape == (40, 37, 3)
        np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
        np.testing.assert_array_equal(infer.tiled_predict(model, image, tiled(mode=mode)), classes)
    # bitwise_blending: a pixel keeps its class where the whole-image prediction agrees, else 0
    labels = infer.tiled_predict(model, image, tiled(mode="bitwise_blending"))
    kept = labels > 0
    np.testing.assert_array_equal(labels[kept], classes[kept])
    assert 0 < kept.sum() < (classes > 0).sum()


def test_batched_equals_one_tile_at_a_time():
    keras.utils.set_random_seed(0)
    model = build_unet(image_height=32, image_width=32, base_filters=4, num_layers=3, dropout_rate=0.0)
    image = random_image(70, 50)
    for mode in ("average", "context"):
        one = infer.tiled_probs(model, image, overlap=4, mode=mode, batch_size=1)
        batched = infer.tiled_probs(model, image, overlap=4, mode=mode, batch_size=5)
        np.testing.assert_allclose(batched, one, atol=1e-5)


# ----------------------------------------------------------------------------- make-tiles

@pytest.fixture
def big_pairs(tmp_path):
    """Two 70x100 image/mask pairs (JPEG image, PNG grey mask with values 0..4 and 255)."""
    rng = np.random.default_rng(7)
    (tmp_path / "big" / "images").mkdir(parents=True)
    (tmp_path / "big" / "masks").mkdir()
    pairs = {}
    for stem in ("a", "b"):
        image = rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)
        mask = rng.choice(np.array([0, 1, 2, 3, 4, 255], np.uint8), (70, 100))
        cv2.imwrite(str(tmp_path / "big" / "images" / f"{stem}.jpg"), image)
        cv2.imwrite(str(tmp_path / "big" / "masks" / f"{stem}.png"), mask)
        pairs[stem] = (cv2.imread(str(tmp_path / "big" / "images" / f"{stem}.jpg")), mask)
    return tmp_path / "big", pairs


def test_make_tiles_writes_exact_crops(big_pairs, tmp_path):
    big, pairs = big_pairs
    out = tmp_path / "tiles"
    result = run("make-tiles", "--images", str(big / "images"), "--masks", str(big / "masks"),
                 "--tile", "32", "--overlap", "8", "--whole", "20", "--output", str(out))
    # stride 24: rows at 0, 24, 38 (shifted: 70 - 32); columns at 0, 24, 48, 68 (100 - 32)
    assert "wrote 24 tile pairs and 2 whole pairs from 2 pairs" in result.output
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == sorted(p.name for p in (out / "masks").iterdir())
    assert names[:13] == [f"a_{r:02d}x{c:02d}.png" for r in range(3) for c in range(4)] + ["a_whole.png"]
    for stem, (image, mask) in pairs.items():
        for r, y in enumerate([0, 24, 38]):
            for c, x in enumerate([0, 24, 48, 68]):
                name = f"{stem}_{r:02d}x{c:02d}.png"
                np.testing.assert_array_equal(cv2.imread(str(out / "images" / name)), image[y:y + 32, x:x + 32])
                tile_mask = cv2.imread(str(out / "masks" / name), cv2.IMREAD_UNCHANGED)
                np.testing.assert_array_equal(tile_mask, mask[y:y + 32, x:x + 32])  # exact labels
        whole = cv2.imread(str(out / "masks" / f"{stem}_whole.png"), cv2.IMREAD_UNCHANGED)
        assert whole.shape == (20, 20) and set(np.unique(whole)) <= {0, 1, 2, 3, 4, 255}  # nearest
        assert cv2.imread(str(out / "images" / f"{stem}_whole.png")).shape == (20, 20, 3)

    # A second run refuses the non-empty output, unless --overwrite (which drops the old tiles).
    again = run("make-tiles", "--images", str(big / "images"), "--masks", str(big / "masks"),
                "--tile", "50", "--output", str(out), ok=False)
    assert again.exit_code == 1 and "already holds 52 files" in again.output and "--overwrite" in again.output
    run("make-tiles", "--images", str(big / "images"), "--masks", str(big / "masks"), "--tile", "50",
        "--output", str(out), "--overwrite", "--edge", "skip")
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a_00x00.png", "a_00x01.png",
                                                                 "b_00x00.png", "b_00x01.png"]


def test_make_tiles_pad_edge(big_pairs, tmp_path):
    big, pairs = big_pairs
    out = tmp_path / "padded"
    run("make-tiles", "--images", str(big / "images"), "--masks", str(big / "masks"), "--tile", "64",
        "--edge", "pad", "--output", str(out))
    assert len(list((out / "images").iterdir())) == 2 * 2 * 2  # 2 x 2 tiles each
    image, mask = pairs["a"]
    last = cv2.imread(str(out / "masks" / "a_01x01.png"), cv2.IMREAD_UNCHANGED)  # rows 64.., cols 64..
    np.testing.assert_array_equal(last[:6, :36], mask[64:70, 64:100])
    assert (last[6:] == 0).all() and (last[:, 36:] == 0).all()  # background padding


# ----------------------------------------------------------------------------- commands, MLflow

def write_yaml(path, root, tmp_path, **sections):
    flat = dict(item.split("=", 1) for item in TINY)
    nested: dict = {"experiment": "tiled-tiny"}
    for key, value in {**flat, "data.root": str(root), "train.output_dir": str(tmp_path / "out")}.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = yaml.safe_load(value)
    for section, values in sections.items():
        nested.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(nested))
    return path


def test_tiled_epoch_panels_logged_and_tiled_infer_entry_point(binary_root, tmp_path, tracking_store):
    from seg_mlops import config

    valid = binary_root / "valid"
    cfg_path = write_yaml(tmp_path / "tiled.yaml", binary_root, tmp_path, train={"epochs": 2},
                          tiled_infer={"epoch_infer_count": 2, "overlap": 4, "tile_size": 24,
                                       "epoch_infer_images": str(valid / "images"),
                                       "epoch_infer_masks": str(valid / "masks")})
    result, run_id = tracking.train(config.load(cfg_path))
    # Files: one panel per image per epoch, input | truth | prediction of the 48 px images.
    panels = sorted(p.name for p in (result.output_dir / "epoch_tiled_infer").iterdir())
    assert panels == [f"epoch_{e:03d}_cell_000{i}.png" for e in (1, 2) for i in (0, 1)]
    assert Image.open(result.output_dir / "epoch_tiled_infer" / panels[0]).size == (3 * 48 + 4, 48)
    # MLflow: the two tiled panels in one picture, epoch_tiled_infer/input-truth-prediction, at
    # every step, next to the plain epoch_infer/input-truth-prediction.
    client = mlflow.MlflowClient()
    pngs = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    logged = sorted((p.split("/")[-1].split("~")[0], p.split("~")[1].split("+step+")[0],
                     int(p.split("+step+")[1].split("+")[0])) for p in pngs)
    expected = sorted((key, "input-truth-prediction", e) for key in ("epoch_infer", "epoch_tiled_infer")
                      for e in range(2))
    assert logged == expected
    tiled_pngs = [p for p in pngs if p.split("/")[-1].startswith("epoch_tiled_infer~")]
    assert Image.open(client.download_artifacts(run_id, tiled_pngs[0])).size == (2 * (3 * 48 + 4) + 4, 48)

    # `mlflow run -e tiled_infer` with the trained model: masks at the original 48 px size.
    proc = subprocess.run([MLFLOW, "run", str(REPO), "-e", "tiled_infer", "-P", f"config={cfg_path}",
                           "-P", f"model_uri={result.model_path}", "-P", f"images={valid / 'images'}",
                           "-P", f"output={tmp_path / 'masks'}", "-P", "set=tiled_infer.mode=context",
                           "--env-manager", "local", "--experiment-name", "tiled-tiny"],
                          env=venv_env(MLFLOW_TRACKING_URI=tracking_store), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    masks = sorted((tmp_path / "masks").glob("*.png"))
    assert [m.stem for m in masks] == [f"cell_000{i}" for i in range(4)]
    model = infer.load_model(result.model_path)
    for mask in masks:
        image = np.asarray(Image.open(valid / "images" / mask.name).convert("RGB"))
        expected = infer.tiled_predict(model, image, tiled(mode="context", overlap=4, tile_size=24))
        np.testing.assert_array_equal(np.asarray(Image.open(mask)), expected * 255)


def test_tiled_infer_command_multiclass(tiny_multiclass_cfg, multiclass_root, tmp_path):
    from seg_mlops import synthetic

    keras.utils.set_random_seed(0)
    model = build_unet(image_height=32, image_width=32, num_classes=3, base_filters=4, num_layers=3)
    model.save(tmp_path / "m.keras")
    cfg_path = tmp_path / "multi.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": {"image_height": 32, "image_width": 32, "num_classes": 3},
                                        "data": {"rgb_map": [list(c) for c in synthetic.rgb_map(3)]},
                                        "tiled_infer": {"overlap": 4}}))
    images = multiclass_root / "test" / "images"
    result = run("tiled-infer", "--config", str(cfg_path), "--model", str(tmp_path / "m.keras"),
                 "--images", str(images), "--output", str(tmp_path / "out"), "--colorize")
    assert "wrote 4 masks" in result.output and "32x32 px tiles, overlap 4, mode average" in result.output
    mask = Image.open(tmp_path / "out" / "cell_0000.png")
    assert mask.mode == "P" and mask.size == (48, 48)
    image = np.asarray(Image.open(images / "cell_0000.png").convert("RGB"))
    expected = infer.tiled_predict(model, image, tiled(overlap=4))
    np.testing.assert_array_equal(np.asarray(mask), expected)
    colour = np.asarray(Image.open(tmp_path / "out" / "colorized" / "cell_0000.png").convert("RGB"))
    np.testing.assert_array_equal(colour, np.asarray(synthetic.rgb_map(3), np.uint8)[expected])
    bad = run("tiled-infer", "--config", str(cfg_path), "--model", str(tmp_path / "m.keras"), "--images",
              str(images), "--output", str(tmp_path / "o2"), "--set", "tiled_infer.overlap=16", ok=False)
    assert bad.exit_code == 1 and "Error: tiled_infer.overlap=16: must be below half the tile" in bad.output


# ----------------------------------------------------------------------------- real data

def test_tiled_cervical_cancer_masks_are_full_size(tmp_path):
    root = real_data("seed-mini-test/Tiled-Cervical-Cancer")
    keras.utils.set_random_seed(0)
    model = build_unet(image_height=32, image_width=32, base_filters=4, num_layers=3, dropout_rate=0.0)
    from seg_mlops import config

    cfg = config.load(None, ["tiled_infer.tile_size=512", "tiled_infer.overlap=64", "tiled_infer.batch_size=20"])
    images = sorted((root / "images").iterdir())[:3]
    (tmp_path / "in").mkdir()
    for path in images:
        (tmp_path / "in" / path.name).symlink_to(path)
    written = infer.tiled_infer_folder(model, tmp_path / "in", tmp_path / "out", cfg, overlays=True)
    assert [p.stem for p in written] == [p.stem for p in images]
    for path in written:
        mask = Image.open(path)
        assert mask.size == (2048, 1536) and mask.mode == "L"
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        assert Image.open(tmp_path / "out" / "overlay" / path.name).size == (2048, 1536)
