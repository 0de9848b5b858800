"""Read an antillia `train_eval_infer.config` (INI with Python-literal values) into our config.

The reference parsed every value with `eval` and fell back to a default on any error, so typos and
malformed values were silently ignored (REFERENCE.md §1, bug B11). Here every value goes through
`ast.literal_eval`, every key of every section must be one the reference reads, and each problem is
reported as `file:line [section] key: ...`:

- malformed values and unknown keys are errors (unknown keys name the closest known one);
- keys that would change results and that seg_mlops cannot honour (another model class, a metric
  or loss we do not have, image pre-processing we do not do) are errors that say what to change;
- keys that are read but have no effect here (output folders, summaries, backups, ...) are notes,
  with the reason.

`convert(path)` returns the mapped nested dict (checked by `config.from_mapping` like a YAML file)
plus the notes; `load(path)` turns it into a Config (seg_mlops.loading calls it for `.config`/`.ini`
paths), and `seg-mlops convert-config` prints it as YAML. Paths are resolved relative to the .config file's folder, as the reference's
scripts (run from that folder) resolved them.
"""

from __future__ import annotations

import ast
import configparser
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from seg_mlops import config
from seg_mlops.errors import SegMlopsError, did_you_mean

# Augmentation probabilities for the reference's on/off flags. The reference appends the original
# plus every enabled variant of a file to a pool and draws from it (ops exclusive, never composed);
# with the Pap-Smear seed's settings ~28 variants per file, so ~3.6 % of samples are unchanged.
# Here ops are drawn independently per sample: flips at 0.5 (a flip is label-preserving and
# symmetric) and every other enabled op at 0.3 leaves 0.25 * 0.7**6 = 2.9 % of samples unchanged
# with those settings: about the reference's mix, without its 30x work per sample.
FLIP_PROBABILITY = 0.5
OP_PROBABILITY = 0.3

# The FlexUNet reference snaps every mask pixel to the nearest rgb_map colour, however far: the
# largest possible RGB distance keeps that behaviour (our default tolerance rejects far colours).
SNAP_ALL = 442.0

_INTERPOLATION = {"cv2.INTER_NEAREST": "nearest", "cv2.INTER_LINEAR": "linear",
                  "cv2.INTER_CUBIC": "cubic", "cv2.INTER_AREA": "area"}
_MODELS = {"TensorflowUNet", "TensorFlowFlexUNet", "TensorflowSlightlyFlexibleUNet"}
# Reference loss/metric names -> ours (None: the task decides, see _metric_name). Any name of
# losses.LOSSES / METRICS is also accepted as itself.
_LOSSES = {"bce_dice_loss": "bce_dice_loss", "dice_loss": "dice_loss", "iou_loss": "iou_loss",
           "binary_crossentropy": "binary_crossentropy",
           "categorical_crossentropy": "categorical_crossentropy",
           # 1 - dice over all channels of a one-hot batch: our dice_loss computes exactly that.
           "dice_loss_multiclass": "dice_loss"}
_METRICS = {"dice_coef": "dice_coef", "iou_coef": "iou_coef", "binary_accuracy": "binary_accuracy",
            "categorical_accuracy": "categorical_accuracy", "accuracy": None,
            # Per-sample dice over all channels incl. background, then the batch mean; our
            # dice_coef is the same sum over the whole batch: equal up to the batch averaging.
            "dice_coef_multiclass": "dice_coef"}

_FLEX_DEFAULT_RGB_MAP = {(0, 0, 0): 0, (0, 255, 0): 1, (255, 0, 0): 2, (0, 0, 255): 3}

_OUTPUTS = "outputs are written under train.output_dir (and logged to MLflow)"
_NO_INPUT_SCALING = ("no effect here: the model takes raw 0-255 pixels and rescales them inside "
                     "(with False the reference trained on unscaled pixels; results may differ)")

# Keys the reference reads that have no effect in seg_mlops: a note with the reason.
NOTES: dict[str, dict[str, str]] = {
    "model": {
        "model": "the TensorflowUNet/TensorFlowFlexUNet graph is model.build_unet",
        "image_channels": "images are always read as RGB (grey images are replicated to 3 channels)",
        "input_normalize": _NO_INPUT_SCALING,
        "dropout_seed_fixing": "every run is seeded (seed: 137) with keras.utils.set_random_seed",
        "final_activation": "the head is sigmoid for num_classes=1 and softmax otherwise",
        "optimizer": "seg_mlops trains with Adam",
        "show_summary": "no effect here",
        "evaluation": "evaluation always uses the test split",
    },
    "dataset": {
        "datasetclass": "pairs are read by seg_mlops.data (RGB, masks encoded before resizing)",
        "class_name": "pairs are read by seg_mlops.data (RGB, masks encoded before resizing)",
        "image_normalize": _NO_INPUT_SCALING,
        "color_order": "images are RGB everywhere (the reference fed BGR to training: its bug B3)",
        "normalized_threshold": "read only with datasetclass NormalizedImageMaskDataset",
    },
    "train": {
        "model_dir": "", "eval_dir": _OUTPUTS, "metrics": "train_metrics.csv holds every compiled metric",
        "steps_per_epoch": "an epoch is one pass over the training split (augmented when generator=True)",
        "validation_steps": "validation is one pass over the valid split, never augmented",
        "create_backup": "seg_mlops never wipes a folder: reusing one needs --overwrite",
        "save_weights_only": "the best model is saved whole as best_model.keras",
        "best_model_file": "the best model is saved as best_model.keras",
        "epoch_change_infer_dir": "epoch panels go to <output_dir>/epoch_infer and MLflow",
        "epoch_change_tiledinfer_dir": "tiled epoch panels go to MLflow (epoch_tiled_infer/)",
        "epoch_change_tiled_infer_dir": "tiled epoch panels go to MLflow (epoch_tiled_infer/)",
        "seedreset_callback": "every run is seeded once with keras.utils.set_random_seed",
        "dataset_splitter": "without [eval], validation is a seeded 20 % of train (data.valid_fraction)",
    },
    "eval": {"batch_size": "evaluation uses train.batch_size", "eval_dir": _OUTPUTS},
    "infer": {
        "output_dir": "pass it to `seg-mlops infer --output`", "colorized_dir": _OUTPUTS,
        "ksize": "read only with blur=True",
        "threshold": "never used by the reference (B9); our masks use infer.threshold (0.5)",
        "algorithm": "never used by the reference (B9)", "binarize": "our masks are always binarized",
    },
    "tiledinfer": {
        "output_dir": "pass it to the tiled inference command's output folder", "merged_dir": _OUTPUTS,
        "binarize": "our masks are always binarized", "threshold": "our masks use infer.threshold",
        "algorithm": "our masks use infer.threshold", "background": "the tiles cover the whole image",
        "mask_colorize": "colour masks: infer.colorize",
    },
    "segmentation": {"black": "binary masks are coloured green on black (config.palette)",
                     "white": "binary masks are coloured green on black (config.palette)",
                     "blursize": "never used by the reference"},
    "mask": {"blur_size": "read only with blur=True", "mask_file_format": "masks pair with images by file stem, any format",
             "mask_colors": "multiclass colours come from rgb_map", "grayscaling": "masks are encoded from RGB",
             "mask_channels": "masks are encoded from RGB"},
    "image": {"color_order": "images are RGB everywhere (the reference fed BGR to training: its bug B3)"},
    "generator": {"debug": "generated pairs are not written (epoch panels show the model's inputs)"},
    "distortion": {"gaussian_filter_sigma": "never used by the reference"},
}

# Keys the mapping below reads: with NOTES, the whole vocabulary (unknown keys are errors).
MAPPED: dict[str, set[str]] = {
    "model": {"generator", "image_width", "image_height", "num_classes", "base_filters", "num_layers",
              "base_kernels", "dilation", "dropout_rate", "normalization", "activation", "learning_rate",
              "clipvalue", "loss", "metrics"},
    "dataset": {"resize_interpolation"},
    "train": {"epochs", "batch_size", "image_datapath", "mask_datapath", "images_dir", "masks_dir", "patience",
              "learning_rate_reducer", "reducer_factor", "reducer_patience", "epoch_change_infer",
              "epoch_change_tiledinfer", "epoch_change_tiled_infer", "num_infer_images"},
    "eval": {"image_datapath", "mask_datapath"},
    "valid": {"images_dir", "masks_dir"},
    "test": {"image_datapath", "mask_datapath", "images_dir", "masks_dir"},
    "infer": {"images_dir", "merged_dir", "blur", "mask_colorize"},
    "tiledinfer": {"images_dir", "overlapping", "split_size", "bitwise_blending"},
    "segmentation": {"colorize"},
    "mask": {"binarize", "threshold", "algorithm", "blur", "rgb_map", "mask_datatype"},
    "image": {"color_converter", "gamma", "sharpening", "contrast_adjuster", "contrast_alpah",
              "contrast_best", "reverse"},
    "generator": {"augmentation"},
    "augmentor": {"vflip", "hflip", "rotation", "angles", "shrinks", "shears", "deformation", "distortion",
                  "barrdistortion", "pincdistortion", "sharpening", "brightening"},
    "deformation": {"alpah", "sigmoids"},
    "distortion": {"gaussian_filter_rsigma", "distortions"},
    "barrdistortion": {"radius", "amount", "centers"},
    "pincdistortion": {"radius", "amount", "centers"},
    "sharpening": {"k"},
    "brightening": {"alpha", "beta"},
}
KNOWN = {s: MAPPED.get(s, set()) | set(NOTES.get(s, {})) for s in {*MAPPED, *NOTES}}

REQUIRED = object()  # the reference fails without the key: an error when absent
OURS = object()  # the reference's default is ours: nothing to write when absent

# The keys that map one to one: read, type-checked and copied. Other keys need logic (the _Mapper
# methods below). A default other than REQUIRED/OURS is the reference's own, written when absent.
_PLAIN = (  # section, key, our key, kind, classic default, FlexUNet default
    ("model", "image_height", "model.image_height", "int", REQUIRED, REQUIRED),
    ("model", "image_width", "model.image_width", "int", REQUIRED, REQUIRED),
    ("model", "base_filters", "model.base_filters", "int", REQUIRED, REQUIRED),
    ("model", "num_classes", "model.num_classes", "int", OURS, REQUIRED),
    ("model", "num_layers", "model.num_layers", "int", REQUIRED, 6),
    ("model", "dropout_rate", "model.dropout_rate", "number", REQUIRED, REQUIRED),
    ("model", "normalization", "model.batch_norm", "bool", OURS, OURS),
    ("model", "learning_rate", "train.learning_rate", "number", REQUIRED, OURS),
    ("model", "clipvalue", "train.clipvalue", "number", 0.2, 0.2),
    ("train", "epochs", "train.epochs", "int", REQUIRED, REQUIRED),
    ("train", "batch_size", "train.batch_size", "int", REQUIRED, 4),
    ("train", "patience", "train.patience", "int", 10, 10),
)

# The parameter sections of the reference's augmentation ops: [section] key -> augment.<ours>.
_AUGMENT_PARAMS = {  # section: ((key, our key, kind), ...)
    "deformation": (("alpah", "deformation_alpha", "number"), ("sigmoids", "deformation_sigmas", "list")),
    "distortion": (("gaussian_filter_rsigma", "distortion_sigma", "number"), ("distortions", "distortions", "list")),
    "barrdistortion": (("radius", "barrel_radius", "number"), ("amount", "barrel_amount", "number"),
                       ("centers", "barrel_centers", "list")),
    "pincdistortion": (("radius", "pincushion_radius", "number"), ("amount", "pincushion_amount", "number"),
                       ("centers", "pincushion_centers", "list")),
    "sharpening": (("k", "sharpening_k", "number"),),
    "brightening": (("alpha", "brightening_alpha", "number"), ("beta", "brightening_beta", "number")),
}
_SECTION_RE = re.compile(r"\[(?P<name>.+)\]")
_KEY_RE = re.compile(r"(?P<key>[^=:]+?)\s*[=:]")


@dataclass
class Conversion:
    """The result of reading a legacy config: our nested config dict plus the notes."""

    source: Path
    raw: dict[str, Any]  # config sections as for config.load (paths absolute)
    notes: list[str] = field(default_factory=list)  # `file:line [section] key: reason`
    flavour: str = "classic"  # "classic" (Tensorflow-Image-Segmentation-API) or "flex" (FlexUNet)


class _Ini:
    """The INI text: literal-eval'd values, line numbers, and which keys the mapping used."""

    def __init__(self, path: Path):
        self.path = path
        text = path.read_text(encoding="utf-8", errors="replace")
        parser = configparser.ConfigParser(interpolation=None, strict=True,
                                           comment_prefixes=(";", "#"), inline_comment_prefixes=None)
        try:
            parser.read_string(text, source=str(path))
        except configparser.Error as exc:  # duplicate key/section, text outside a section, ...
            line = getattr(exc, "lineno", None)
            first = str(exc).splitlines()[0]
            raise SegMlopsError(f"{path}{f':{line}' if line else ''}: not a valid config file ({first})") from None
        self.lines = _line_numbers(text)
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.used: set[tuple[str, str]] = set()
        self.malformed: set[tuple[str, str]] = set()
        self.values: dict[tuple[str, str], Any] = {}
        for section in parser.sections():
            for key, raw in parser.items(section):
                try:
                    self.values[(section, key)] = ast.literal_eval(raw.strip()) if raw.strip() else None
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    self.error(section, key, f"malformed value {raw.strip()!r} (expected a Python literal: "
                                             "quoted string, number, True/False/None, list, tuple or dict)")
                    self.malformed.add((section, key))
                    self.used.add((section, key))
        self.sections = parser.sections()

    def where(self, section: str, key: str | None = None) -> str:
        line = self.lines.get((section, key)) or self.lines.get((section, None))
        return f"{self.path}{f':{line}' if line else ''} [{section}]" + (f" {key}" if key else "")

    def error(self, section: str, key: str | None, message: str) -> None:
        self.errors.append(f"{self.where(section, key)}: {message}")

    def note(self, section: str, key: str | None, message: str) -> None:
        self.notes.append(f"{self.where(section, key)}: {message}")

    def has(self, section: str, key: str) -> bool:
        return (section, key) in self.values

    def get(self, section: str, key: str, default: Any = REQUIRED) -> Any:
        """The value (marked as used), `default` when absent, or an error when required."""
        if (section, key) in self.malformed:
            return None  # already reported
        self.used.add((section, key))
        if (section, key) in self.values:
            return self.values[(section, key)]
        if default is REQUIRED:
            self.error(section, key, "missing (the reference requires it)")
            return None
        return default


def _line_numbers(text: str) -> dict[tuple[str, str | None], int]:
    """{(section, key): line} for every `key = value` line, {(section, None): line} per header;
    keys lower-cased as configparser does."""
    lines: dict[tuple[str, str | None], int] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip()[0] in ";#" or line[0].isspace():
            continue  # blank, comment, or a continuation line
        match = _SECTION_RE.match(line.strip())
        if match:
            section = match.group("name").strip()
            lines.setdefault((section, None), number)
            continue
        match = _KEY_RE.match(line.strip())
        if match:
            lines.setdefault((section, match.group("key").strip().lower()), number)
    return lines


# ----------------------------------------------------------------------------- typed getters

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Mapper:
    """Maps the reference's keys onto our nested config, section by section."""

    def __init__(self, ini: _Ini):
        self.ini = ini
        self.base = ini.path.resolve().parent
        self.out: dict[str, dict[str, Any]] = {s: {} for s in
                                               ("data", "model", "train", "augment", "infer", "tiled_infer")}
        # our key -> where it came from, so a range/type error from config.from_mapping names the line
        self.origin: dict[str, str] = {}
        model = ini.get("model", "model", "TensorflowUNet")
        self.flavour = "flex" if isinstance(model, str) and "flex" in model.lower() else "classic"
        self.flex = self.flavour == "flex"

    def set(self, ours: str, value: Any, section: str, key: str) -> None:
        group, _, name = ours.partition(".")
        self.out[group][name] = value
        self.origin[ours] = self.ini.where(section, key)

    def typed(self, section: str, key: str, kind: str, default: Any = REQUIRED) -> Any:
        """get() plus a type check: kind is "int", "number", "bool", "str", "path" or "list"."""
        value = self.ini.get(section, key, default)
        if value is None or value is default:
            return value
        ok = {"int": isinstance(value, int) and not isinstance(value, bool), "number": _is_number(value),
              "bool": isinstance(value, bool), "str": isinstance(value, str), "path": isinstance(value, str),
              "list": isinstance(value, (list, tuple))}[kind]
        if not ok:
            expected = {"int": "an integer", "number": "a number", "bool": "True or False",
                        "str": "a quoted string", "path": "a quoted path", "list": "a list [..]"}[kind]
            self.ini.error(section, key, f"{value!r}: expected {expected}")
            return None
        return self.path(value) if kind == "path" else value

    def path(self, value: str) -> str:
        return os.path.normpath(self.base / os.path.expanduser(value))

    def copy(self, section: str, key: str, ours: str, kind: str, default: Any = REQUIRED) -> Any:
        """typed(), then set() unless the value is missing, malformed or OURS."""
        value = self.typed(section, key, kind, default)
        if value is not None and value is not OURS:
            self.set(ours, list(value) if isinstance(value, tuple) else value, section, key)
        return value

    def plain(self) -> None:
        for section, key, ours, kind, classic, flex in _PLAIN:
            self.copy(section, key, ours, kind, flex if self.flex else classic)

    # --------------------------------------------------------------------------- sections

    def model(self) -> None:
        ini = self.ini
        name = ini.get("model", "model", "TensorflowUNet")
        if name not in _MODELS:
            ini.error("model", "model", f"{name!r}: seg_mlops builds the TensorflowUNet graph only; "
                                        "set model = \"TensorflowUNet\" to train it, or keep the reference for this class")
        for key, ours in (("base_kernels", "model.base_kernels"), ("dilation", "model.dilation")):
            value = ini.get("model", key, (3, 3) if key == "base_kernels" else (1, 1))
            if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1] \
                    and isinstance(value[0], int) and not isinstance(value[0], bool):
                self.set(ours, value[0], "model", key)
            elif value is not None:
                ini.error("model", key, f"{value!r}: expected a square (k, k) of integers "
                                        f"({ours} is one number for both axes)")
        activation = self.typed("model", "activation", "str", "relu")
        if activation:
            self.set("model.activation", activation.rsplit(".", 1)[-1], "model", "activation")
        final = ini.get("model", "final_activation", None)
        if final not in (None, "sigmoid", "softmax"):
            ini.error("model", "final_activation", f"{final!r}: the head is sigmoid (1 class) or softmax; "
                                                    "remove the key")
        optimizer = ini.get("model", "optimizer", "Adam")
        if optimizer != "Adam":
            ini.error("model", "optimizer", f"{optimizer!r}: seg_mlops trains with Adam; set optimizer = \"Adam\"")

    def loss_and_metrics(self) -> None:
        ini = self.ini
        classes = self.out["model"].get("num_classes", 1)
        loss = self.typed("model", "loss", "str", "categorical_crossentropy" if self.flex else REQUIRED)
        if loss is not None:
            if loss in _LOSSES:
                self.set("train.loss", _LOSSES[loss], "model", "loss")
            else:
                ini.error("model", "loss", f"{loss!r} is not available here; use one of "
                                           f"{', '.join(sorted(set(_LOSSES)))}")
        metrics = self.typed("model", "metrics", "list", ["dice_coef_multiclass"] if self.flex else REQUIRED)
        if metrics is not None:
            names = []
            for metric in metrics:
                if metric not in _METRICS:
                    ini.error("model", "metrics", f"metric {metric!r} is not available here; use some of "
                                                  f"{', '.join(sorted(_METRICS))}")
                    continue
                ours = _METRICS[metric] or ("binary_accuracy" if classes == 1 else "categorical_accuracy")
                if ours not in names:
                    names.append(ours)
            self.set("train.metrics", names, "model", "metrics")
        # The reference's checkpoint, LR reducer and early stopping all watched val_loss.
        self.out["train"]["monitor"] = "val_loss"

    def dataset(self) -> None:
        ini = self.ini
        cls = ini.get("dataset", "datasetclass", None)
        cls = ini.get("dataset", "class_name", cls)
        if cls == "NormalizedImageMaskDataset":
            threshold = self.typed("dataset", "normalized_threshold", "number", 0.15)
            self.set("data.binary_mask", "threshold", "dataset", "datasetclass")
            self.set("data.mask_threshold", max(1, round(threshold * 255)), "dataset", "normalized_threshold")
        elif cls not in (None, "ImageMaskDataset", "ImageCategorizedMaskDataset"):
            key = "class_name" if ini.has("dataset", "class_name") else "datasetclass"
            ini.error("dataset", key, f"{cls!r} is not supported (images are read as RGB); "
                                      "use \"ImageMaskDataset\" (or \"ImageCategorizedMaskDataset\" for FlexUNet)")
        interp = ini.get("dataset", "resize_interpolation", None)
        if interp is not None:
            if interp in _INTERPOLATION:
                self.set("data.image_interpolation", _INTERPOLATION[interp], "dataset", "resize_interpolation")
                self.ini.note("dataset", "resize_interpolation", "images only: masks are always resized "
                              "with nearest neighbour (the reference resized masks the same way, B8)")
            else:
                ini.error("dataset", "resize_interpolation",
                          f"{interp!r}: use one of {', '.join(repr(k) for k in _INTERPOLATION)}")
        elif not self.flex:
            # the classic reference resized images with INTER_NEAREST by default
            self.out["data"]["image_interpolation"] = "nearest"

    def splits(self) -> None:
        ini, sections = self.ini, self.ini.sections
        # classic names image_datapath/mask_datapath, FlexUNet images_dir/masks_dir: whichever is there
        classic = ini.has("train", "image_datapath") or (not self.flex and not ini.has("train", "images_dir"))
        train_keys = ("image_datapath", "mask_datapath") if classic else ("images_dir", "masks_dir")
        self.copy("train", train_keys[0], "data.train_images", "path")
        self.copy("train", train_keys[1], "data.train_masks", "path")
        valid = "valid" if "valid" in sections else "eval"
        keys = ("images_dir", "masks_dir") if valid == "valid" else ("image_datapath", "mask_datapath")
        if valid not in sections:
            # The reference then took 20 % of train (a sorted 80/20 split, or Keras' validation_split
            # =0.2 on the last 20 %); a seeded random share of whole files does the same job without
            # the order bias (its offline-augmented copies sort together).
            self.out["data"]["valid_fraction"] = 0.2
            ini.notes.append(f"{ini.path}: no [eval] (or [valid]) section: validation is 20 % of train as in the "
                             "reference (data.valid_fraction: 0.2, seeded; set data.valid_group to keep "
                             "augmented copies of one image together)")
        else:
            self.copy(valid, keys[0], "data.valid_images", "path")
            self.copy(valid, keys[1], "data.valid_masks", "path")
        if "test" in sections:
            keys = ("images_dir", "masks_dir") if ini.has("test", "images_dir") else ("image_datapath", "mask_datapath")
            self.copy("test", keys[0], "data.test_images", "path")
            self.copy("test", keys[1], "data.test_masks", "path")
        else:
            ini.notes.append(f"{ini.path}: no [test] section: evaluation needs "
                             "--set data.test_images=... --set data.test_masks=...")

    def train(self) -> None:
        ini, flex = self.ini, self.flex
        model_dir = self.typed("train", "model_dir", "path", None)
        if model_dir:
            self.set("train.output_dir", model_dir, "train", "model_dir")
            ini.note("train", "model_dir", "train.output_dir: holds best_model.keras, the CSVs and epoch panels")
        patience = self.out["train"].get("patience")  # from _PLAIN
        if ini.get("train", "learning_rate_reducer", False):
            factor = self.typed("train", "reducer_factor", "number", 0.1)
            reducer = self.typed("train", "reducer_patience", "int", int((patience or 0) / 2))
            if reducer == 0:
                ini.error("train", "reducer_patience", "0 would disable the LR reducer here; "
                                                      "set learning_rate_reducer = False instead")
            self.set("train.reducer_factor", factor, "train", "reducer_factor")
            self.set("train.reducer_patience", reducer, "train", "reducer_patience")
            if flex and ini.has("train", "reducer_patience"):
                ini.note("train", "reducer_patience", f"honoured ({reducer}); the FlexUNet reference misspelled "
                                                      "the keyword and ran with Keras' default 10 (its bug B4)")
        else:
            for key in ("reducer_factor", "reducer_patience"):
                if ini.has("train", key):
                    ini.get("train", key)
                    ini.note("train", key, "unused: learning_rate_reducer is False")
            self.set("train.reducer_patience", 0, "train", "learning_rate_reducer")

    def inference(self) -> None:
        ini, flex = self.ini, self.flex
        count = self.typed("train", "num_infer_images", "int", 6 if flex else 1)
        infer_images = self.typed("infer", "images_dir", "path", None)
        if infer_images:
            ini.note("infer", "images_dir", "pass it to `seg-mlops infer --images`")
        if ini.get("train", "epoch_change_infer", flex):
            self.set("train.epoch_infer_count", count, "train", "num_infer_images")
            if infer_images:
                self.set("train.epoch_infer_images", infer_images, "infer", "images_dir")
                self._sibling_masks(infer_images, "train.epoch_infer_masks", "infer", "images_dir")
        else:
            self.set("train.epoch_infer_count", 0, "train", "epoch_change_infer")
        merged = ini.get("infer", "merged_dir", None)
        if merged:
            self.set("infer.overlay", True, "infer", "merged_dir")
        if ini.get("infer", "blur", False):
            ini.error("infer", "blur", "blurring the probability map is not supported; set blur = False")
        # both read (no short-circuit), so neither is reported as unused
        colorize = [ini.get("segmentation", "colorize", False), ini.get("infer", "mask_colorize", False)]
        if any(colorize):
            key = ("segmentation", "colorize") if ini.has("segmentation", "colorize") else ("infer", "mask_colorize")
            self.set("infer.colorize", True, *key)

        tiled_flag = any([ini.get("train", "epoch_change_tiledinfer", False),
                          ini.get("train", "epoch_change_tiled_infer", False)])
        if "tiledinfer" in ini.sections:
            split = self.typed("tiledinfer", "split_size", "int", None)
            if split:
                self.set("tiled_infer.tile_size", split, "tiledinfer", "split_size")
            self.copy("tiledinfer", "overlapping", "tiled_infer.overlap", "int", 64 if flex else 0)
            # classic: bitwise AND with the whole-image mask (default on); FlexUNet: no blending.
            # Without blending the reference pasted each tile's centre, the overlap as context.
            blend = ini.get("tiledinfer", "bitwise_blending", not flex)
            self.set("tiled_infer.mode", "bitwise_blending" if blend else "context", "tiledinfer", "bitwise_blending")
            tiled_images = self.typed("tiledinfer", "images_dir", "path", None)
            if tiled_flag and tiled_images:
                self.set("tiled_infer.epoch_infer_count", count, "train", "num_infer_images")
                self.set("tiled_infer.epoch_infer_images", tiled_images, "tiledinfer", "images_dir")
                self._sibling_masks(tiled_images, "tiled_infer.epoch_infer_masks", "tiledinfer", "images_dir")
        elif tiled_flag:
            key = "epoch_change_tiledinfer" if ini.has("train", "epoch_change_tiledinfer") else "epoch_change_tiled_infer"
            ini.error("train", key, "True needs a [tiledinfer] section with images_dir")

    def _sibling_masks(self, images: str, ours: str, section: str, key: str) -> None:
        """Panels show the ground truth when the images folder has a sibling masks folder
        (the seeds' mini_test/{images,masks} layout)."""
        masks = Path(images).parent / "masks"
        if Path(images).name == "images" and masks.is_dir():
            self.set(ours, str(masks), section, key)

    def masks(self) -> None:
        ini = self.ini
        classes = self.out["model"].get("num_classes", 1)
        if classes >= 2 or ini.has("mask", "rgb_map"):
            default = {c: i for c, i in _FLEX_DEFAULT_RGB_MAP.items() if i < classes}
            rgb_map = ini.get("mask", "rgb_map", default)
            colours = self._rgb_map(rgb_map)
            if colours is not None:
                self.set("data.rgb_map", colours, "mask", "rgb_map")
                self.set("data.color_tolerance", SNAP_ALL, "mask", "rgb_map")
            kind = ini.get("mask", "mask_datatype", "categorized")
            if kind != "categorized":
                ini.error("mask", "mask_datatype", f"{kind!r}: masks are read as colour images mapped by "
                                                   "rgb_map; use \"categorized\" RGB masks")
        if classes == 1:
            binarize = ini.get("mask", "binarize", False)
            algorithm = ini.get("mask", "algorithm", None)
            if algorithm is not None:
                ini.error("mask", "algorithm", f"{algorithm!r}: only a fixed threshold is supported; "
                                               "remove algorithm and set threshold")
            if binarize:
                threshold = self.typed("mask", "threshold", "int")
                self.set("data.binary_mask", "threshold", "mask", "binarize")
                if threshold is not None:
                    self.set("data.mask_threshold", threshold, "mask", "threshold")
            elif "binary_mask" not in self.out["data"]:
                # The reference cast masks to bool: any non-zero pixel was foreground (B8).
                self.set("data.binary_mask", "nonzero", "mask", "binarize")
                if ini.has("mask", "threshold"):
                    ini.get("mask", "threshold")
                    ini.note("mask", "threshold", "unused as in the reference (binarize = False: any non-zero "
                                                  "pixel is foreground); for noisy JPEG masks set binarize = True")
        if ini.get("mask", "blur", False):
            ini.error("mask", "blur", "blurring masks changes the labels; set blur = False")

    def _rgb_map(self, value: Any) -> list[list[int]] | None:
        """{(r, g, b): index} -> [[r, g, b], ...] ordered by index 0..n-1."""
        bad = "expected a dict {(r, g, b): class index} with indices 0..n-1, background first"
        if not isinstance(value, dict) or not value:
            self.ini.error("mask", "rgb_map", f"{value!r}: {bad}")
            return None
        by_index: dict[int, list[int]] = {}
        for colour, index in value.items():
            if not (isinstance(colour, tuple) and len(colour) == 3 and all(isinstance(c, int) and 0 <= c <= 255
                                                                         for c in colour)) \
                    or not isinstance(index, int) or index in by_index:
                self.ini.error("mask", "rgb_map", f"entry {colour!r}: {index!r}: {bad}")
                return None
            by_index[index] = list(colour)
        if sorted(by_index) != list(range(len(by_index))):
            self.ini.error("mask", "rgb_map", f"indices {sorted(by_index)}: {bad}")
            return None
        return [by_index[i] for i in range(len(by_index))]

    def image(self) -> None:
        ini = self.ini
        for key, neutral in (("color_converter", None), ("gamma", 0), ("sharpening", 0),
                             ("contrast_adjuster", False), ("reverse", False)):
            value = ini.get("image", key, neutral)
            if value not in (neutral, None, False, 0):
                ini.error("image", key, f"{value!r}: image pre-processing is not supported (the model sees the "
                                        f"images as stored); remove {key} or set it to {neutral!r}")
        for key in ("contrast_alpah", "contrast_best"):  # the PAP src's spelling; read with contrast_adjuster
            if ini.has("image", key):
                ini.get("image", key)
                ini.note("image", key, "read only with contrast_adjuster = True")

    def augmentation(self) -> None:
        ini = self.ini
        generator = ini.get("model", "generator", False)
        enabled = generator and ini.get("generator", "augmentation", True)
        sections = ("generator", "augmentor", "deformation", "distortion", "barrdistortion", "pincdistortion",
                    "sharpening", "brightening")
        if not enabled:
            reason = "generator = False" if not generator else "[generator] augmentation = False"
            for section in sections:
                for (s, key) in list(ini.values):
                    if s == section and (s, key) not in ini.used:
                        ini.get(s, key)
                        ini.note(s, key, f"unused: {reason} (as in the reference, no online augmentation)")
            return
        a = "augmentor"
        for flag, ours, p in (("hflip", "hflip", FLIP_PROBABILITY), ("vflip", "vflip", FLIP_PROBABILITY),
                              ("rotation", "rotation", OP_PROBABILITY)):
            on = self.typed(a, flag, "bool", True)
            self.set(f"augment.{ours}", p if on else 0.0, a, flag)
        for key, ours, prob, default in (("angles", "angles", "rotation", [90, 180, 270]),
                                          ("shrinks", "shrinks", "shrink", [0.8]), ("shears", "shears", "shear", [])):
            values = self.typed(a, key, "list", default)
            if values is None:
                continue
            if not all(_is_number(v) for v in values):
                ini.error(a, key, f"{values!r}: expected a list of numbers")
                continue
            if values:
                self.set(f"augment.{ours}", [float(v) for v in values], a, key)
            if prob != "rotation":  # shrinks/shears have no flag: a non-empty list enables them
                self.set(f"augment.{prob}", OP_PROBABILITY if values else 0.0, a, key)
            elif not values:
                self.set("augment.rotation", 0.0, a, key)
        ops = (("deformation", "deformation"), ("distortion", "distortion"), ("barrdistortion", "barrel"),
               ("pincdistortion", "pincushion"), ("sharpening", "sharpening"), ("brightening", "brightening"))
        for flag, ours in ops:
            on = self.typed(a, flag, "bool", False)
            if on:
                self.set(f"augment.{ours}", OP_PROBABILITY, a, flag)
                if flag in ("sharpening", "brightening"):
                    ini.note(a, flag, "applied to the image only (the reference also changed the mask: B7)")
            for key, ours_key, kind in _AUGMENT_PARAMS[flag]:
                if ini.has(flag, key):
                    value = self.typed(flag, key, kind)  # type-checked even when unused
                    if not on:
                        ini.note(flag, key, f"unused: [augmentor] {flag} is off")
                    elif value is not None:
                        if kind == "list":
                            value = [list(v) if isinstance(v, tuple) else v for v in value]
                        self.set(f"augment.{ours_key}", value, flag, key)

    def leftovers(self) -> None:
        """Every key the mapping did not read: a note (known, no effect) or an error (unknown)."""
        ini = self.ini
        for section in ini.sections:
            if section not in KNOWN:
                ini.error(section, None, "unknown section" + did_you_mean(section, KNOWN))
                continue
            for (s, key) in ini.values:
                if s != section or (s, key) in ini.used:
                    continue
                if key in NOTES.get(section, {}):
                    if NOTES[section][key]:
                        ini.note(section, key, NOTES[section][key])
                elif key in MAPPED.get(section, set()):
                    ini.note(section, key, "unused with the other settings of this file")
                else:
                    ini.error(section, key, "unknown key" + did_you_mean(key, KNOWN[section]))


def convert(path: str | Path) -> Conversion:
    """Read a reference train_eval_infer.config and map it to our config.

    Args:
        path: the .config file; relative paths inside it are resolved from its folder.

    Returns:
        A Conversion whose `raw` is checked by config.from_mapping like a YAML file.

    Raises:
        SegMlopsError: listing every malformed, unknown or unsupported key as `file:line [section] key: ...`.
    """
    path = Path(path)
    if not path.is_file():
        raise SegMlopsError(f"config file not found: {path}")
    ini = _Ini(path)
    mapper = _Mapper(ini)
    for step in (mapper.plain, mapper.model, mapper.loss_and_metrics, mapper.dataset, mapper.splits, mapper.train,
                 mapper.inference, mapper.masks, mapper.image, mapper.augmentation, mapper.leftovers):
        step()
    if ini.errors:
        head = f"{path}: {len(ini.errors)} problems in this legacy config:\n" if len(ini.errors) > 1 else ""
        raise SegMlopsError(head + "\n".join(ini.errors))
    # experiment name: the project folder (projects/.../Pap-Smear/train_eval_infer.config), or
    # the file's own name when it is not the reference's fixed one
    stem = path.stem if path.stem != "train_eval_infer" else path.resolve().parent.name
    name = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "default"
    raw: dict[str, Any] = {"experiment": name, "seed": 137}
    raw.update({section: values for section, values in mapper.out.items() if values})
    notes = sorted(ini.notes, key=_line_of)
    conversion = Conversion(path, raw, notes, mapper.flavour)
    _check(conversion, mapper.origin)
    return conversion


def load(path: str | Path, overrides: Iterable[str] | Mapping[str, Any] = ()) -> config.Config:
    """The Config of a reference .config (as config.load for YAML): converted, its notes printed
    to stderr, then `overrides` applied (see config.load)."""
    conversion = convert(path)  # paths already absolute
    report(conversion.notes)
    return config.from_mapping(conversion.raw, overrides=overrides)


def _line_of(message: str) -> int:
    match = re.match(r"[^\[]*?:(\d+) \[", message)
    return int(match.group(1)) if match else 0


class _Dumper(yaml.SafeDumper):
    """Block mappings, flow lists: `rgb_map: [[0, 0, 0], [0, 255, 0]]` stays on one line."""


_Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))


def _check(conversion: Conversion, origin: dict[str, str]) -> None:
    """Build the Config now, so a value out of our ranges is reported with its .config line."""
    try:
        config.from_mapping(conversion.raw)
    except SegMlopsError as exc:
        message = str(exc)
        for ours, where in sorted(origin.items(), key=lambda kv: -len(kv[0])):
            if ours in message:
                raise SegMlopsError(f"{where}: {message}") from None
        raise SegMlopsError(f"{conversion.source}: {message}") from None


def to_yaml(conversion: Conversion, relative_to: str | Path | None = None) -> str:
    """Our YAML for a conversion, with a header naming the source.

    Args:
        conversion: the result of convert().
        relative_to: write paths relative to this folder (the folder the YAML will live in);
            None keeps them absolute.
    """
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in conversion.raw.items()}
    if relative_to is not None:
        base = Path(relative_to).resolve()
        path_keys = {(section, f.name) for section, cls in config.SECTIONS.items()
                     for f in dataclasses.fields(cls) if f.metadata.get("path")}
        for section, values in raw.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    if (section, key) in path_keys and value:
                        values[key] = os.path.relpath(value, base)
    header = (f"# Converted by `seg-mlops convert-config` from {conversion.source}\n"
              f"# (antillia {'FlexUNet' if conversion.flavour == 'flex' else 'Tensorflow-Image-Segmentation-API'}"
              " train_eval_infer.config). Keys and defaults: seg_mlops/config.py.\n")
    return header + yaml.dump(raw, Dumper=_Dumper, sort_keys=False, width=100)


def report(notes: list[str], stream: Any = None) -> None:
    """Print the notes, one per line, to `stream` (default stderr)."""
    import sys

    for note in notes:
        print(f"note: {note}", file=stream or sys.stderr)
