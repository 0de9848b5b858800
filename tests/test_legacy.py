"""Legacy configs: the five seed experiments' train_eval_infer.config texts (tests/legacy_configs/)
map to our config key by key; malformed values and unknown keys are errors with file:line; keys
without effect are notes; `convert-config` and `train --config x.config` work from the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from seg_mlops import config, legacy, loading
from seg_mlops.cli import cli
from seg_mlops.errors import SegMlopsError
from seg_mlops.infer import load_model
from tests.conftest import numpy_scores

FIXTURES = Path(__file__).parent / "legacy_configs"
# the reference scripts ran from the project folder: ../../../dataset is 3 levels above it
DATASET = (FIXTURES / "../../../dataset").resolve()


def fixed(tmp_path: Path, name: str, old: str, new: str) -> Path:
    """A copy of a fixture with one typo corrected (kept in the fixtures folder's place: tmp)."""
    text = (FIXTURES / name).read_text()
    assert old in text
    path = tmp_path / "project" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace(old, new))
    return path


def test_pap_smear_maps_every_value():
    conv = legacy.convert(FIXTURES / "pap_smear.config")
    cfg = config.from_mapping(conv.raw)
    assert conv.flavour == "classic" and cfg.experiment == "pap-smear"
    assert (cfg.model.image_height, cfg.model.image_width, cfg.model.num_classes) == (512, 512, 1)
    assert (cfg.model.base_filters, cfg.model.num_layers, cfg.model.base_kernels, cfg.model.dilation) == (16, 8, 9, 3)
    assert cfg.model.dropout_rate == 0.03
    t = cfg.train
    assert (t.learning_rate, t.clipvalue, t.epochs, t.batch_size, t.patience) == (1e-4, 0.5, 100, 2, 10)
    assert (t.reducer_factor, t.reducer_patience) == (0.4, 4)
    assert (t.loss, t.metrics, t.monitor) == ("bce_dice_loss", ("dice_coef",), "val_loss")
    # paths relative to the .config's folder; epoch inference on [infer] images_dir, 6 images
    assert cfg.data.train_images == str(DATASET / "Pap-Smear/severe_dysplastic/train/images")
    assert cfg.data.valid_masks == str(DATASET / "Pap-Smear/severe_dysplastic/valid/masks")
    assert cfg.data.test_images == str(DATASET / "Pap-Smear/severe_dysplastic/test/images")
    assert (t.epoch_infer_count, t.epoch_infer_images) == (6, str(FIXTURES / "mini_test/images"))
    assert t.output_dir == str(FIXTURES / "models")
    # binarize = False: the reference's bool cast, i.e. any non-zero pixel is foreground
    assert cfg.data.binary_mask == "nonzero"
    assert cfg.data.image_interpolation == "nearest"  # the classic default resize_interpolation
    assert cfg.infer.colorize is True  # [segmentation] colorize
    assert "augment" not in conv.raw  # generator = False: no online augmentation, as the reference
    assert cfg.augment == config.AugmentConfig()
    # keys without effect are notes with their line, sorted by line
    assert f"{FIXTURES / 'pap_smear.config'}:23 [model] show_summary: no effect here" in conv.notes
    assert any(n.startswith(f"{FIXTURES / 'pap_smear.config'}:89 [augmentor] angles: unused: generator = False")
               for n in conv.notes)
    lines = [legacy._line_of(n) for n in conv.notes]
    # every key not mapped gets one: [model] 2, [train] 9, [infer] 2, [segmentation] 3, [mask] 2,
    # [generator] 2, [augmentor] 11, parameter sections 11
    assert lines == sorted(lines) and len(conv.notes) == 42


def test_cervical_typo_is_an_error_with_its_line(tmp_path):
    with pytest.raises(SegMlopsError) as err:
        legacy.convert(FIXTURES / "tiled_cervical_cancer.config")
    assert str(err.value) == (f"{FIXTURES / 'tiled_cervical_cancer.config'}:120 [deformation] sigmoids: "
                              "malformed value '[8.0 10.0]' (expected a Python literal: quoted string, number, "
                              "True/False/None, list, tuple or dict)")

    cfg = loading.load(fixed(tmp_path, "tiled_cervical_cancer.config", "[8.0 10.0]", "[8.0, 10.0]"))
    a = cfg.augment  # generator = True: [augmentor] flags become per-sample probabilities
    assert (a.hflip, a.vflip, a.rotation, a.shrink, a.shear) == (0.5, 0.5, 0.3, 0.3, 0.3)
    assert a.angles == (60.0, 120.0, 180.0, 240.0, 300.0) and a.shrinks == (0.6, 0.8) and a.shears == (0.1,)
    assert (a.deformation, a.deformation_alpha, a.deformation_sigmas) == (0.3, 1300.0, (8.0, 10.0))
    assert (a.distortion, a.distortion_sigma, a.distortions) == (0.3, 40.0, (0.02, 0.03))
    assert (a.barrel, a.sharpening, a.brightening) == (0.0, 0.0, 0.0)  # flags False
    assert a.barrel_radius == 0.5  # [barrdistortion] of a disabled op is not copied (a note)
    assert cfg.train.metrics == ("binary_accuracy",) and cfg.train.reducer_factor == 0.2
    assert cfg.data.test_images == str(tmp_path / "project/mini_test/Metaplastic/images")
    # [tiledinfer]: overlapping 128, bitwise_blending False = tiles' centres pasted, overlap as context
    ti = cfg.tiled_infer
    assert (ti.tile_size, ti.overlap, ti.mode, ti.epoch_infer_count) == (0, 128, "context", 1)
    assert ti.epoch_infer_images == str(tmp_path / "project/mini_test/Metaplastic/images")
    assert cfg.infer.overlay is True  # [infer] merged_dir


def test_pancreas_typo_is_an_error_even_when_unused(tmp_path):
    # generator = False, so the reference never used angles, but the typo is still reported
    with pytest.raises(SegMlopsError, match=r"cropped_pancreas.config:100 \[augmentor\] angles: "
                                            r"malformed value '\[90. 180, 270,\]'"):
        legacy.convert(FIXTURES / "cropped_pancreas.config")
    conv = legacy.convert(fixed(tmp_path, "cropped_pancreas.config", "[90. 180, 270,]", "[90, 180, 270]"))
    cfg = config.from_mapping(conv.raw)
    assert cfg.data.image_interpolation == "cubic"  # "cv2.INTER_CUBIC"
    assert (cfg.model.base_kernels, cfg.model.dilation, cfg.train.learning_rate) == (9, 3, 7e-5)
    assert (cfg.tiled_infer.overlap, cfg.tiled_infer.mode, cfg.tiled_infer.epoch_infer_count) == \
        (64, "bitwise_blending", 0)  # classic default blending True; epoch_change_tiledinfer False
    assert "augment" not in conv.raw
    assert any("[mask] threshold: unused as in the reference" in n for n in conv.notes)


def test_edf_two_class_flexunet():
    conv = legacy.convert(FIXTURES / "tiled_edf_cervical_cytology.config")
    cfg = config.from_mapping(conv.raw)
    assert conv.flavour == "flex"
    assert cfg.model.num_classes == 2 and cfg.data.rgb_map == ((0, 0, 0), (255, 255, 255))
    assert cfg.data.color_tolerance == legacy.SNAP_ALL  # nearest colour, however far, as FlexUNet
    assert (cfg.train.loss, cfg.train.metrics) == ("categorical_crossentropy", ("dice_coef",))
    assert (cfg.model.base_kernels, cfg.model.dropout_rate, cfg.train.clipvalue) == (9, 0.02, 0.4)
    assert cfg.data.train_images == str(DATASET / "Tiled-EDF-Cervical-Cytology/train/images")
    assert cfg.data.valid_images == str(DATASET / "Tiled-EDF-Cervical-Cytology/valid/images")  # [valid]
    assert cfg.train.reducer_patience == 4
    assert (f"{FIXTURES / 'tiled_edf_cervical_cytology.config'}:59 [train] reducer_patience: honoured (4); "
            "the FlexUNet reference misspelled the keyword and ran with Keras' default 10 (its bug B4)") in conv.notes


def test_breast_cancer_cell_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(SegMlopsError) as err:
        legacy.convert(FIXTURES / "breast_cancer_cell.config")
    assert str(err.value) == (f"{FIXTURES / 'breast_cancer_cell.config'}:83 [mask] mask_datatyoe: "
                              "unknown key; did you mean 'mask_datatype'?")
    cfg = loading.load(fixed(tmp_path, "breast_cancer_cell.config", "mask_datatyoe", "mask_datatype"))
    # {(0,0,0):0, (0,255,0):1, (255,0,0):2} -> ordered by class index
    assert cfg.model.num_classes == 3 and cfg.data.rgb_map == ((0, 0, 0), (0, 255, 0), (255, 0, 0))
    assert (cfg.model.base_kernels, cfg.train.epoch_infer_count) == (7, 6)  # FlexUNet default: 6 images


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.config"
    path.write_text(text)
    return path


MINIMAL = """[model]
image_width = 64
image_height = 64
num_classes = 1
base_filters = 4
num_layers = 3
dropout_rate = 0.0
learning_rate = 0.01
loss = "bce_dice_loss"
metrics = ["dice_coef"]
{model}
[train]
epochs = 1
batch_size = 4
image_datapath = "data/train/images"
mask_datapath = "data/train/masks"
[eval]
image_datapath = "data/valid/images"
mask_datapath = "data/valid/masks"
{rest}
"""


@pytest.mark.parametrize("model, rest, message", [
    ('model = "TensorFlowFlexSwinUNet"', "",
     ':11 [model] model: \'TensorFlowFlexSwinUNet\': seg_mlops builds the TensorflowUNet graph only'),
    ('base_kernels = (3,5)', "", ":11 [model] base_kernels: (3, 5): expected a square (k, k) of integers"),
    ('optimizer = "AdamW"', "", ":11 [model] optimizer: 'AdamW': seg_mlops trains with Adam"),
    ("", "[image]\ngamma = 2.2", ":21 [image] gamma: 2.2: image pre-processing is not supported"),
    ("", "[mask]\nblur = True", ":21 [mask] blur: blurring masks changes the labels"),
    ("", "[dataset]\nresize_interpolation = \"cv2.INTER_LANCZOS4\"", ":21 [dataset] resize_interpolation: "
                                                                   "'cv2.INTER_LANCZOS4': use one of"),
    # never eval: a call is not a literal
    ('activation = __import__("os").getcwd()', "", ":11 [model] activation: malformed value"),
    ("", "[augmentor]\nvflip = True", ""),  # generator False: a note, not an error
    ("", "[tiledinfer]\noverlaping = 64", ":21 [tiledinfer] overlaping: unknown key; did you mean 'overlapping'?"),
    ("", "[tiledinfr]\noverlapping = 64", ":20 [tiledinfr]: unknown section; did you mean 'tiledinfer'?"),
])
def test_unsupported_values_are_errors_with_their_line(tmp_path, model, rest, message):
    path = write(tmp_path, MINIMAL.format(model=model, rest=rest))
    if not message:
        assert any(":21 [augmentor] vflip: unused: generator = False" in n for n in legacy.convert(path).notes)
        return
    with pytest.raises(SegMlopsError) as err:
        legacy.convert(path)
    assert str(err.value).startswith(f"{path}{message}")


def test_metric_loss_and_rgb_map_errors(tmp_path):
    text = MINIMAL.format(model="", rest="[mask]\nrgb_map = {(0,0,0):0, (255,0,0):2}").replace(
        'metrics = ["dice_coef"]', 'metrics = ["dice_coef", "sensitivity"]').replace(
        '"bce_dice_loss"', '"basnet_hybrid_loss"').replace("num_classes = 1", "num_classes = 2")
    path = write(tmp_path, text)
    with pytest.raises(SegMlopsError) as err:
        legacy.convert(path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: 3 problems in this legacy config:"
    assert lines[1].startswith(f"{path}:9 [model] loss: 'basnet_hybrid_loss' is not available here; use one of")
    assert lines[2].startswith(f"{path}:10 [model] metrics: metric 'sensitivity' is not available here")
    assert lines[3] == (f"{path}:21 [mask] rgb_map: indices [0, 2]: expected a dict {{(r, g, b): class index}} "
                        "with indices 0..n-1, background first")


def test_duplicate_key_and_missing_required(tmp_path):
    path = write(tmp_path, MINIMAL.format(model="epochs = 3\nepochs = 4", rest=""))
    with pytest.raises(SegMlopsError, match=r"x.config:12: not a valid config file \(While reading from "):
        legacy.convert(path)
    path = write(tmp_path, MINIMAL.format(model="", rest="").replace("dropout_rate = 0.0\n", ""))
    with pytest.raises(SegMlopsError) as err:
        legacy.convert(path)
    assert str(err.value) == f"{path}:1 [model] dropout_rate: missing (the reference requires it)"
    # a value outside our ranges is reported with the .config line it came from
    path = write(tmp_path, MINIMAL.format(model="", rest="").replace("dropout_rate = 0.0", "dropout_rate = 1.5"))
    with pytest.raises(SegMlopsError) as err:
        legacy.convert(path)
    assert str(err.value) == f"{path}:7 [model] dropout_rate: model.dropout_rate=1.5: must be <= 0.99"


def test_missing_eval_section_carves_20_percent_of_train(tmp_path):
    text = MINIMAL.format(model="", rest="").replace(
        '[eval]\nimage_datapath = "data/valid/images"\nmask_datapath = "data/valid/masks"\n', "")
    path = write(tmp_path, text)
    conversion = legacy.convert(path)  # the old converter refused it: "needs an explicit validation split"
    assert conversion.raw["data"]["valid_fraction"] == 0.2
    assert "valid_images" not in conversion.raw["data"]
    assert any("no [eval] (or [valid]) section: validation is 20 % of train" in n for n in conversion.notes)


def test_reducer_defaults_follow_the_reference(tmp_path):
    # learning_rate_reducer absent: off (ours is on by default); on without factor/patience:
    # the reference's 0.1 and int(patience / 2)
    off = loading.load(write(tmp_path, MINIMAL.format(model="", rest="")))
    assert off.train.reducer_patience == 0 and off.train.clipvalue == 0.2 and off.train.patience == 10
    on = loading.load(write(tmp_path, MINIMAL.format(model="", rest="").replace(
        "epochs = 1", "epochs = 1\npatience = 7\nlearning_rate_reducer = True")))
    assert (on.train.reducer_factor, on.train.reducer_patience, on.train.patience) == (0.1, 3, 7)


def test_convert_config_cli_round_trip(tmp_path):
    src = fixed(tmp_path, "breast_cancer_cell.config", "mask_datatyoe", "mask_datatype")
    (tmp_path / "configs").mkdir()
    result = CliRunner().invoke(cli, ["convert-config", str(src), "--relative-to", str(tmp_path / "configs")])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"# Converted by `seg-mlops convert-config` from {src}\n")
    assert "rgb_map: [[0, 0, 0], [0, 255, 0], [255, 0, 0]]" in result.stdout
    assert "train_images: ../../../dataset/Breast-Cancer-Cell/train/images" in result.stdout
    assert f"note: {src}:34 [model] show_summary: no effect here" in result.stderr
    assert "note:" not in result.stdout
    out = tmp_path / "configs" / "bcc.yaml"
    out.write_text(result.stdout)
    # the YAML and the .config give the same Config
    assert loading.load(out) == loading.load(src)
    assert yaml.safe_load(result.stdout)["train"]["monitor"] == "val_loss"

    bad = CliRunner().invoke(cli, ["convert-config", str(FIXTURES / "breast_cancer_cell.config")])
    assert bad.exit_code == 1
    assert bad.output.strip() == (f"Error: {FIXTURES / 'breast_cancer_cell.config'}:83 [mask] mask_datatyoe: "
                                  "unknown key; did you mean 'mask_datatype'?")


def test_train_runs_a_legacy_config_directly(tmp_path, binary_root):
    """`seg-mlops train --config train_eval_infer.config`: paths relative to the .config's folder."""
    os.symlink(binary_root, tmp_path / "data")
    text = MINIMAL.format(model="", rest="[test]\nimage_datapath = \"data/test/images\"\n"
                                         "mask_datapath = \"data/test/masks\"\n").replace(
        "[train]", "[train]\nmodel_dir = \"./models\"\nepoch_change_infer = True\nnum_infer_images = 2")
    path = tmp_path / "train_eval_infer.config"
    path.write_text(text.replace("image_width = 64", "image_width = 32").replace("image_height = 64", "image_height = 32"))
    result = CliRunner().invoke(cli, ["train", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert f"model: {tmp_path / 'models' / 'best_model.keras'}" in result.stdout
    assert "after 1 epochs" in result.stdout
    assert f"note: {path}:5 [model] num_layers" not in result.stderr  # mapped keys give no note
    resolved = yaml.safe_load((tmp_path / "models" / "config.yaml").read_text())
    assert resolved["model"]["base_filters"] == 4 and resolved["train"]["monitor"] == "val_loss"
    assert resolved["data"]["train_images"] == str(tmp_path / "data" / "train" / "images")
    assert resolved["experiment"] == tmp_path.name.lower().replace("_", "-")  # the .config's folder
    assert sorted(p.name for p in (tmp_path / "models" / "epoch_infer").iterdir())[:1] != []
    score = dict(line.split(",") for line in (tmp_path / "models" / "evaluation.csv").read_text().split()[1:])
    assert set(score) >= {"loss", "dice_coef", "dice_foreground"}
    expected = numpy_scores(load_model(tmp_path / "models" / "best_model.keras"),
                            config.load(tmp_path / "models" / "config.yaml"), "test")
    assert float(score["dice_coef"]) == pytest.approx(expected["dice_coef"], abs=6e-5)
    assert float(score["dice_foreground"]) == pytest.approx(expected["dice_foreground"], abs=6e-5)
