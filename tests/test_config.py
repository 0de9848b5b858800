"""Tests for seg_mlops.config: defaults, YAML typing, error messages, overrides, paths, round trips."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from seg_mlops import config
from seg_mlops.config import Config, DataConfig, ModelConfig, flatten, load, override, to_yaml
from seg_mlops.errors import SegMlopsError

# The defaults as load() gives them: train.monitor "auto" resolved for the default binary model.
DEFAULTS = dataclasses.replace(Config(), train=dataclasses.replace(Config().train, monitor="val_dice_coef"))


@pytest.mark.parametrize(("overrides", "monitor"), [
    ([], "val_dice_coef"),  # binary: dice_coef is the foreground dice
    (["model.num_classes=3", "data.rgb_map=[[0,0,0],[0,255,0],[255,0,0]]"], "val_class_dice"),
    (["model.num_classes=3", "data.rgb_map=[[0,0,0],[0,255,0],[255,0,0]]", "train.monitor=val_dice_coef"],
     "val_dice_coef"),  # an explicit choice is kept
])
def test_monitor_auto_is_the_foreground_dice(overrides, monitor):
    # On the old main the multiclass default was val_dice_coef, which sums the background channel
    # of one-hot masks: close to pixel accuracy, and what checkpoint, pruning and registry ranked by.
    assert Config().train.monitor == "auto"
    assert load(None, overrides).train.monitor == monitor


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _error(path_or_text, tmp_path: Path | None = None, overrides=()) -> str:
    """The message of the SegMlopsError that load() raises for a YAML text (or None) and overrides."""
    path = None
    if path_or_text is not None:
        path = _write(tmp_path / "exp.yaml", path_or_text)
    with pytest.raises(SegMlopsError) as info:
        load(path, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------- defaults and YAML

def test_defaults_load_with_none():
    cfg = load(None)
    assert cfg == DEFAULTS
    assert cfg.experiment == "default" and cfg.seed == 137
    assert cfg.model.num_classes == 1 and cfg.model.base_filters == 16 and cfg.model.base_kernels == 3
    assert cfg.train.epochs == 50 and cfg.train.learning_rate == 1e-4
    assert cfg.data.binary_mask == "auto" and cfg.data.mask_threshold == 128
    assert cfg.data.rgb_map == () and cfg.train.metrics == ()
    assert cfg.output_dir == Path("outputs/default")
    assert cfg.palette() == [(0, 0, 0), (0, 255, 0)]


def test_yaml_sections_load_with_types(tmp_path):
    path = _write(tmp_path / "exp.yaml", """
experiment: cells
seed: 7
model:
  base_filters: 8
  batch_norm: true
  dropout_rate: 0
train:
  learning_rate: 1e-4
  epochs: 3
  metrics: [dice_coef, iou]
infer:
  threshold: 0.25
""")
    cfg = load(path)
    assert cfg.experiment == "cells" and cfg.seed == 7
    assert cfg.model.base_filters == 8 and type(cfg.model.base_filters) is int
    assert cfg.model.batch_norm is True
    # 0 written as an int becomes the float the field declares.
    assert cfg.model.dropout_rate == 0.0 and type(cfg.model.dropout_rate) is float
    # PyYAML reads "1e-4" (no dot) as a string; the config turns it into the float.
    assert cfg.train.learning_rate == pytest.approx(0.0001) and type(cfg.train.learning_rate) is float
    assert cfg.train.epochs == 3
    assert cfg.train.metrics == ("dice_coef", "iou")
    assert cfg.infer.threshold == 0.25
    # Keys not in the file keep their defaults.
    assert cfg.model.num_layers == ModelConfig().num_layers and cfg.data == DataConfig()
    assert cfg.output_dir == Path("outputs/cells")


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load(_write(tmp_path / "empty.yaml", "# nothing yet\n")) == DEFAULTS


def test_empty_section_gives_defaults(tmp_path):
    assert load(_write(tmp_path / "exp.yaml", "model:\ntrain:\n  epochs: 2\n")).model == ModelConfig()


@pytest.mark.parametrize("value", ["[]", "0", "false"])
def test_section_that_is_not_a_mapping_is_an_error(tmp_path, value):
    msg = _error(f"model: {value}\n", tmp_path)
    assert msg.startswith("model: expected a mapping of keys")


def test_section_that_is_a_scalar_is_an_error(tmp_path):
    assert _error("model: 5\n", tmp_path) == "model: expected a mapping of keys, got 5"


# ----------------------------------------------------------------------------- unknown keys

def test_unknown_key_names_full_key_and_closest(tmp_path):
    msg = _error("model:\n  base_filter: 8\n", tmp_path)
    assert msg == "unknown config key 'model.base_filter'; did you mean 'model.base_filters'?"


def test_unknown_key_via_set_names_closest():
    msg = _error(None, overrides=["train.learning_rat=0.1"])
    assert msg == "unknown config key 'train.learning_rat'; did you mean 'train.learning_rate'?"


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    msg = _error("infer:\n  zzzzzz: 1\n", tmp_path)
    assert msg.startswith("unknown config key 'infer.zzzzzz'; valid: ")
    assert "infer.batch_size" in msg and "infer.threshold" in msg and "did you mean" not in msg


def test_unknown_section_in_yaml(tmp_path):
    msg = _error("modle:\n  base_filters: 8\n", tmp_path)
    assert msg == "unknown config key 'modle'; did you mean 'model'?"


def test_unknown_section_in_set():
    msg = _error(None, overrides=["trian.epochs=3"])
    assert msg == "unknown config section 'trian' in 'trian.epochs'; did you mean 'train'?"


# ----------------------------------------------------------------------------- types and ranges

@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("train:\n  epochs: ten\n", "train.epochs='ten': expected an integer"),  # string for int
    ("train:\n  epochs: 2.5\n", "train.epochs=2.5: expected an integer"),  # float for int
    ("train:\n  epochs: true\n", "train.epochs=True: expected an integer"),  # bool for int
    ("model:\n  batch_norm: 1\n", "model.batch_norm=1: expected true or false"),  # int for bool
    ("model:\n  activation: 3\n", "model.activation=3: expected a string"),
    ("train:\n  learning_rate: fast\n", "train.learning_rate='fast': expected a number"),
    ("train:\n  learning_rate: true\n", "train.learning_rate=True: expected a number"),
    ("train:\n  metrics: dice_coef\n", "train.metrics='dice_coef': expected a list of a string"),
    ("data:\n  rgb_map: [[0, 0, 0], [255, 0, x]]\n", "data.rgb_map='x': expected an integer"),
])
def test_wrong_type_names_key_and_value(tmp_path, yaml_text, expected):
    assert _error(yaml_text, tmp_path) == expected


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("train:\n  epochs: -1\n", "train.epochs=-1: must be >= 1"),
    ("train:\n  epochs: 0\n", "train.epochs=0: must be >= 1"),
    ("data:\n  mask_threshold: 0\n", "data.mask_threshold=0: must be >= 1"),
    ("data:\n  mask_threshold: 256\n", "data.mask_threshold=256: must be <= 255"),
    ("data:\n  binary_mask: bool\n", "data.binary_mask='bool': must be one of auto, threshold, nonzero"),
    ("model:\n  dropout_rate: 1.0\n", "model.dropout_rate=1.0: must be <= 0.99"),
    ("infer:\n  threshold: -0.1\n", "infer.threshold=-0.1: must be >= 0"),
    ("seed: -5\n", "seed=-5: must be >= 0"),
])
def test_out_of_range_names_key_value_and_bound(tmp_path, yaml_text, expected):
    assert _error(yaml_text, tmp_path) == expected


def test_range_bounds_are_inclusive(tmp_path):
    cfg = load(_write(tmp_path / "exp.yaml", "data:\n  mask_threshold: 1\ninfer:\n  threshold: 1\n"
                                             "train:\n  patience: 0\n"))
    assert cfg.data.mask_threshold == 1 and cfg.infer.threshold == 1.0 and cfg.train.patience == 0


@pytest.mark.parametrize("item", ["train.learning_rate=.nan", "infer.threshold=nan"])
def test_nan_is_rejected(item):
    with pytest.raises(SegMlopsError, match=re.escape(item.split("=")[0])):
        load(None, [item])


# ----------------------------------------------------------------------------- --set overrides

def test_set_overrides_are_typed():
    cfg = load(None, ["model.base_filters=32", "train.learning_rate=1e-3", "train.clipvalue=1",
                      "model.batch_norm=true", "infer.colorize=yes", "experiment=cells", "seed=3",
                      "data.rgb_map=[[0,0,0],[255,0,0]]", "model.num_classes=2",
                      "train.metrics=[dice_coef, iou]"])
    assert cfg.model.base_filters == 32 and type(cfg.model.base_filters) is int
    assert cfg.train.learning_rate == pytest.approx(1e-3) and type(cfg.train.learning_rate) is float
    assert cfg.train.clipvalue == 1.0 and type(cfg.train.clipvalue) is float
    assert cfg.model.batch_norm is True and cfg.infer.colorize is True
    assert cfg.experiment == "cells" and cfg.seed == 3
    assert cfg.data.rgb_map == ((0, 0, 0), (255, 0, 0)) and cfg.model.num_classes == 2
    assert cfg.palette() == [(0, 0, 0), (255, 0, 0)]
    assert cfg.train.metrics == ("dice_coef", "iou")
    # Untouched keys keep their defaults.
    assert cfg.model.num_layers == 6 and cfg.train.epochs == 50


def test_set_overrides_the_yaml_and_keeps_its_other_keys(tmp_path):
    path = _write(tmp_path / "exp.yaml", "model:\n  base_filters: 8\n  num_layers: 4\n")
    cfg = load(path, ["model.base_filters=12"])
    assert cfg.model.base_filters == 12 and cfg.model.num_layers == 4


def test_set_wrong_type_names_key_and_value():
    assert _error(None, overrides=["model.batch_norm=1"]) == "model.batch_norm=1: expected true or false"
    assert _error(None, overrides=["train.epochs=abc"]) == "train.epochs='abc': expected an integer"


@pytest.mark.parametrize("item", ["foo", "model.base_filters", "=3"])
def test_malformed_set(item):
    msg = _error(None, overrides=[item])
    assert msg == f"--set {item!r}: expected section.key=value, e.g. train.epochs=3"


def test_set_empty_value_is_empty_string():
    assert load(None, ["model.activation=", "experiment=x"]).model.activation == ""


# ----------------------------------------------------------------------------- paths

def test_yaml_paths_are_relative_to_the_config_folder(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter for paths in the file
    folder = (tmp_path / "configs" / "cells").resolve()
    path = _write(folder / "exp.yaml", f"""
data:
  root: data
  train_images: ../shared/imgs
  valid_masks: {tmp_path.resolve() / 'abs' / 'masks'}
train:
  output_dir: ./runs
""")
    cfg = load(path)
    assert cfg.data.root == str(folder / "data")
    assert cfg.data.train_images == str(folder.parent / "shared" / "imgs")
    assert cfg.data.valid_masks == str(tmp_path.resolve() / "abs" / "masks")  # absolute: untouched
    assert cfg.train.output_dir == str(folder / "runs")
    assert cfg.data.test_images == ""  # empty paths stay empty (meaning: the default layout)
    assert cfg.output_dir == folder / "runs"


def test_set_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    path = _write(folder / "exp.yaml", "data:\n  root: data\n")
    cwd = (tmp_path / "work").resolve()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    absolute = str(tmp_path.resolve() / "abs" / "out")
    cfg = load(path, ["data.train_masks=masks/train", f"train.output_dir={absolute}"])
    assert cfg.data.train_masks == str(cwd / "masks" / "train")
    assert cfg.train.output_dir == absolute
    assert cfg.data.root == str(folder.resolve() / "data")  # from the file: still the file's folder
    # override() with a mapping resolves from the working directory too.
    assert override(cfg, {"data.root": "other"}).data.root == str(cwd / "other")


# ----------------------------------------------------------------------------- cross-key checks

@pytest.mark.parametrize(("overrides", "expected"), [
    (["model.num_classes=3", "data.rgb_map=[[0,0,0],[255,0,0]]"],
     "data.rgb_map has 2 colours but model.num_classes=3: give one [r, g, b] per class, background first"),
    (["model.num_classes=3"],
     "data.rgb_map has 0 colours but model.num_classes=3: give one [r, g, b] per class, background first"),
    (["data.rgb_map=[[0,0,0],[255,0,0]]"],
     "data.rgb_map is set but model.num_classes=1 (binary): "
     "set model.num_classes to the number of colours, or remove data.rgb_map"),
    (["model.num_classes=3", "data.rgb_map=[[0,0,0],[255,0,0],[0,0,0]]"],
     "data.rgb_map has a repeated colour: [[0, 0, 0], [255, 0, 0], [0, 0, 0]]"),
    (["model.num_classes=2", "data.rgb_map=[[0,0,0],[256,0,0]]"],
     "data.rgb_map entry [256, 0, 0]: expected [r, g, b] with values 0..255"),
    (["model.num_classes=2", "data.rgb_map=[[0,0,0],[-1,0,0]]"],
     "data.rgb_map entry [-1, 0, 0]: expected [r, g, b] with values 0..255"),
    (["model.num_classes=2", "data.rgb_map=[[0,0,0],[255,0]]"],
     "data.rgb_map entry [255, 0]: expected [r, g, b] with values 0..255"),
    (["model.base_kernels=4"], "model.base_kernels=4 must be an odd number >= 1; use e.g. 3, 5 or 7"),
    # Level i drops dropout_rate * i: the bridge (level num_layers-1) must keep something.
    (["model.dropout_rate=0.3", "model.num_layers=5", "model.image_height=64", "model.image_width=64"],
     "model.dropout_rate=0.3 with model.num_layers=5 gives the bridge (level 4) a dropout of 1.2, which must "
     "be below 1 (level i drops dropout_rate * i); use model.dropout_rate <= 0.24, or fewer model.num_layers"),
    (["model.dropout_rate=0.2", "model.num_layers=6"],
     "model.dropout_rate=0.2 with model.num_layers=6 gives the bridge (level 5) a dropout of 1, which must "
     "be below 1 (level i drops dropout_rate * i); use model.dropout_rate <= 0.19, or fewer model.num_layers"),
    (["model.image_height=30"],
     "model.image_height=30 is not divisible by 2**(num_layers-1)=32 (model.num_layers=6); use 32, or fewer layers"),
    (["model.image_width=100", "model.num_layers=4"],
     "model.image_width=100 is not divisible by 2**(num_layers-1)=8 (model.num_layers=4); use 96 or 104, "
     "or fewer layers"),
])
def test_cross_key_checks(overrides, expected):
    assert _error(None, overrides=overrides) == expected


def test_cross_key_checks_apply_to_the_yaml_file(tmp_path):
    msg = _error("model:\n  num_classes: 3\ndata:\n  rgb_map: [[0, 0, 0], [0, 255, 0]]\n", tmp_path)
    assert msg.startswith("data.rgb_map has 2 colours but model.num_classes=3")


def test_largest_allowed_dropout_is_accepted():
    # The suggested bound loads and is the largest such two-decimal value (at 2 layers 0.99 is fine).
    for layers in range(3, 9):
        message = _error(None, overrides=["model.dropout_rate=0.99", f"model.num_layers={layers}",
                                          "model.image_height=128", "model.image_width=128"])
        largest = float(re.search(r"model.dropout_rate <= ([0-9.]+)", message).group(1))
        cfg = load(None, [f"model.dropout_rate={largest}", f"model.num_layers={layers}",
                          "model.image_height=128", "model.image_width=128"])
        assert cfg.model.dropout_rate * (layers - 1) < 1 <= round(largest + 0.01, 2) * (layers - 1)


def test_override_checks_across_keys_after_applying_all():
    multi = load(None, ["model.num_classes=2", "data.rgb_map=[[0,0,0],[0,255,0]]"])
    # Changing num_classes alone would break the colour count; both together are fine.
    with pytest.raises(SegMlopsError, match=r"has 2 colours but model.num_classes=3"):
        override(multi, {"model.num_classes": 3})
    three = override(multi, {"model.num_classes": 3, "data.rgb_map": [[0, 0, 0], [0, 255, 0], [255, 0, 0]]})
    assert three.model.num_classes == 3 and three.data.rgb_map[2] == (255, 0, 0)


# ----------------------------------------------------------------------------- flatten / override

def test_flatten_keys_and_values():
    flat = flatten(load(None, ["model.base_filters=16", "train.metrics=[iou]"]))
    assert flat["model.base_filters"] == 16
    assert flat["experiment"] == "default" and flat["seed"] == 137
    assert flat["train.learning_rate"] == 1e-4 and flat["data.mask_threshold"] == 128
    assert flat["train.metrics"] == ("iou",) and flat["data.rgb_map"] == ()
    expected_keys = {"experiment", "seed"} | {
        f"{section}.{f.name}" for section, cls in config.SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(flat) == expected_keys
    # Every value is a scalar or a tuple, except the search space (a mapping by nature).
    assert not any(isinstance(v, (dict, DataConfig, ModelConfig)) for k, v in flat.items() if k != "tune.space")
    assert flat["tune.space"] == config.DEFAULT_SPACE


def test_flatten_then_override_is_identity():
    cfg = load(None, ["model.num_classes=2", "data.rgb_map=[[0,0,0],[9,9,9]]", "seed=1"])
    assert override(Config(), flatten(cfg)) == cfg


def test_override_returns_new_config_and_leaves_old_unchanged():
    cfg = load(None)
    new = override(cfg, {"model.base_filters": 32, "train.learning_rate": 1})
    assert new.model.base_filters == 32 and new.train.learning_rate == 1.0
    assert type(new.train.learning_rate) is float
    assert cfg.model.base_filters == 16 and cfg.train.learning_rate == 1e-4
    assert new is not cfg and new != cfg
    assert new.model.num_layers == cfg.model.num_layers and new.data is cfg.data
    assert override(cfg, {}) is cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.base_filters = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_override_checks_values():
    with pytest.raises(SegMlopsError) as info:
        override(Config(), {"train.epochs": 0})
    assert str(info.value) == "train.epochs=0: must be >= 1"


# ----------------------------------------------------------------------------- to_yaml

def test_to_yaml_round_trips(tmp_path):
    cfg = load(None, ["model.num_classes=3", "data.rgb_map=[[0,0,0],[0,255,0],[255,0,0]]",
                      "train.learning_rate=1e-5", "train.metrics=[dice_coef]", "model.batch_norm=true",
                      f"data.root={tmp_path.resolve() / 'data'}", "infer.threshold=0.3"])
    cfg = override(cfg, {"experiment": "yes"})  # a string that YAML would read as a bool unquoted
    text = to_yaml(cfg)
    assert "rgb_map:" in text and "(" not in text  # plain lists, no Python tuples
    again = load(_write(tmp_path / "elsewhere" / "resolved.yaml", text))
    assert again == cfg
    assert again.experiment == "yes"  # "yes" is quoted, not turned into a bool


def test_to_yaml_round_trips_defaults(tmp_path):
    assert load(_write(tmp_path / "d.yaml", to_yaml(Config()))) == DEFAULTS


# ----------------------------------------------------------------------------- split_dirs

def test_split_dirs_default_layout():
    cfg = load(None, ["data.root=/data/cells"])
    assert cfg.split_dirs("train") == (Path("/data/cells/train/images"), Path("/data/cells/train/masks"))
    assert cfg.split_dirs("test") == (Path("/data/cells/test/images"), Path("/data/cells/test/masks"))


def test_split_dirs_honours_explicit_folders():
    cfg = load(None, ["data.root=/data/cells", "data.valid_images=/x/val_img", "data.train_masks=/y/m"])
    assert cfg.split_dirs("valid") == (Path("/x/val_img"), Path("/data/cells/valid/masks"))
    assert cfg.split_dirs("train") == (Path("/data/cells/train/images"), Path("/y/m"))


# ----------------------------------------------------------------------------- file errors

def test_invalid_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.yaml", "model:\n  base_filters: 8\n  num_layers: [1, 2\ntrain: {\n")
    with pytest.raises(SegMlopsError) as info:
        load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path} line ") and "not valid YAML" in msg


def test_invalid_yaml_line_number(tmp_path):
    path = _write(tmp_path / "bad.yaml", "experiment: x\nseed: 1\nmodel: a: b\n")
    with pytest.raises(SegMlopsError) as info:
        load(path)
    assert str(info.value) == f"{path} line 3: not valid YAML (mapping values are not allowed here)"


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SegMlopsError) as info:
        load(missing)
    assert str(info.value) == f"config file not found: {missing}"
    with pytest.raises(SegMlopsError, match="config file not found"):
        load(tmp_path)  # a folder is not a config file


def test_top_level_not_a_mapping(tmp_path):
    assert _error("- 1\n- 2\n", tmp_path) == "config: expected a mapping of keys, got [1, 2]"


def test_set_can_make_the_file_consistent(tmp_path):
    # The file alone is inconsistent (2 colours, default num_classes=1); the override fixes it,
    # so the cross-key checks run after the overrides.
    path = _write(tmp_path / "exp.yaml", "data:\n  rgb_map: [[0, 0, 0], [255, 255, 255]]\n")
    assert load(path, ["model.num_classes=2"]).model.num_classes == 2
    with pytest.raises(SegMlopsError, match="data.rgb_map is set but model.num_classes=1"):
        load(path)


def test_set_of_a_whole_section_is_an_error():
    with pytest.raises(SegMlopsError, match=r"--set model=\.\.\.: name a key of the section"):
        load(None, ["model=3"])
