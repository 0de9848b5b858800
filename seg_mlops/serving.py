"""The registered model: the whole segmentation pipeline as an MLflow pyfunc model.

Encoded images of any size in (a DataFrame column `image` of PNG/JPEG/TIFF bytes: base64 strings
over REST, which MLflow's scoring server decodes for a binary column; in Python also HxWx3 uint8
RGB arrays), masks at each image's own size out, with per-class pixel counts. The inference params
(mode, threshold, tiles, tta, output) are in the model signature, so `mlflow models serve`,
`mlflow.pyfunc.spark_udf` and `mlflow.pyfunc.load_model` take them as they are. The work is
`infer.segment` / `infer.probabilities`: the same code as `seg-mlops infer` and `tiled-infer`.

The model carries this package's code (code_paths) and the Keras network (an artifact), and needs
only the pip requirements it lists: no Optuna, no training code runs at load.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from seg_mlops import infer
from seg_mlops.config import Config
from seg_mlops.data import decode_bytes, to_rgb
from seg_mlops.errors import SegMlopsError

PIPELINE_NAME = "pipeline"  # the pipeline model's name inside a run (the raw network is "model")
KERAS_ARTIFACT = "keras_model"
# The pipeline's settings (model_config below) travel as an artifact of the model, not as MLflow's
# `model_config`: MLflow logs that as params of the run, and a run's params are printed above the
# epoch picture in every image card of the UI (see tracking.COMPARED_KEYS).
CONFIG_ARTIFACT = "pipeline_config"
INPUT_COLUMN = "image"
# param -> allowed values (the string params; the signature only checks types)
CHOICES = {"mode": ("resize", "tiled"), "blend": ("average", "context", "bitwise_blending"),
           "output": ("mask", "probabilities", "colorized"), "on_error": ("raise", "report"),
           "encoding": ("bytes", "base64")}
# The pipeline's own requirements (distribution names): what the pipeline imports at load.
REQUIREMENTS = ("keras", "numpy", "opencv-python-headless", "pillow", "PyYAML", "pandas")


def params_schema(cfg: Config):
    """The inference params with the config's values as defaults."""
    from mlflow.types.schema import ParamSchema, ParamSpec

    t = cfg.tiled_infer
    return ParamSchema([
        ParamSpec("mode", "string", "resize"),
        ParamSpec("threshold", "double", float(cfg.infer.threshold)),
        ParamSpec("tile_size", "long", int(t.tile_size)),
        ParamSpec("overlap", "long", int(t.overlap)),
        ParamSpec("blend", "string", t.mode),
        ParamSpec("tta", "boolean", False),
        ParamSpec("output", "string", "mask"),
        ParamSpec("on_error", "string", "raise"),
        ParamSpec("encoding", "string", "bytes"),
    ])


def signature(cfg: Config):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, INPUT_COLUMN)]),
        outputs=Schema([ColSpec(DataType.binary, "mask"), ColSpec(DataType.long, "height"),
                        ColSpec(DataType.long, "width"), ColSpec(Array(DataType.long), "pixels"),
                        ColSpec(DataType.string, "error")]),
        params=params_schema(cfg))


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_requirements() -> list[str]:
    tf = "tensorflow-cpu" if _version("tensorflow-cpu") else "tensorflow"
    return [f"{dist}=={_version(dist)}" for dist in (tf, *REQUIREMENTS) if _version(dist)]


def model_config(model, cfg: Config) -> dict[str, Any]:
    """What the pipeline needs besides the network and the params: the palette, batch sizes and
    resizing of the training config."""
    return {"palette": [list(c) for c in cfg.palette()], "interpolation": cfg.data.image_interpolation,
            "batch_size": cfg.infer.batch_size, "tile_batch_size": cfg.tiled_infer.batch_size,
            "classes": int(model.output_shape[-1])}


def log_pipeline(model, cfg: Config, name: str = PIPELINE_NAME) -> str:
    """Log the pipeline model of a Keras network (raw 0..255 pixels in, probabilities out) into the
    active run; returns its models:/ URI."""
    package = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        path, settings = Path(tmp) / "model.keras", Path(tmp) / "pipeline_config.json"
        model.save(path)
        settings.write_text(json.dumps(model_config(model, cfg)))
        info = mlflow.pyfunc.log_model(
            name=name, python_model=SegmentationPipeline(),
            artifacts={KERAS_ARTIFACT: str(path), CONFIG_ARTIFACT: str(settings)},
            code_paths=[str(package)], signature=signature(cfg), pip_requirements=pip_requirements())
    return info.model_uri


def keras_file(local_dir: str | Path) -> Path:
    """The Keras network inside a downloaded pipeline model folder."""
    from mlflow.models import Model

    local_dir = Path(local_dir)
    flavor = Model.load(local_dir / "MLmodel").flavors.get("python_function", {})
    artifact = flavor.get("artifacts", {}).get(KERAS_ARTIFACT, {}).get("path")
    if artifact is None:
        raise SegMlopsError(f"{local_dir} is not a seg_mlops pipeline model (no {KERAS_ARTIFACT} artifact)")
    return local_dir / artifact


class BadInput(MlflowException):
    """A request the pipeline cannot serve: MLflow's scoring server answers 400 with the line."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class SegmentationPipeline(mlflow.pyfunc.PythonModel):
    """Images in, masks out; see the module docstring. Output columns: `mask` (bytes: a PNG for
    output=mask, as `seg-mlops infer` writes it, or colorized; a float32 .npy (H, W, C) for
    probabilities), `height`, `width`, `pixels` (pixel count of each class id in the mask; empty
    for output=probabilities) and `error`
    (empty, or why the image failed with on_error=report; with on_error=raise a bad image fails
    the whole call with one line). encoding=base64 gives `mask` as a base64 string (Spark: a
    spark_udf result cannot be binary)."""

    def load_context(self, context) -> None:
        import keras

        self.model = keras.models.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)
        settings = context.artifacts.get(CONFIG_ARTIFACT)  # pipelines logged before it: model_config
        self.config = json.loads(Path(settings).read_text()) if settings else dict(context.model_config or {})

    def settings(self, params: dict | None) -> tuple[infer.Settings, str, str]:
        """(Settings, output, on_error) from the call's params (`encoding` is read by predict); a
        bad value is BadInput."""
        params = dict(params or {})
        for key, allowed in CHOICES.items():
            if key in params and params[key] not in allowed:
                raise BadInput(f"param {key}={params[key]!r}: expected one of {', '.join(allowed)}")
        threshold = float(params.get("threshold", 0.5))
        if not 0 <= threshold <= 1:
            raise BadInput(f"param threshold={threshold}: expected a value in [0, 1]")
        for key in ("tile_size", "overlap"):
            if int(params.get(key, 0)) < 0:
                raise BadInput(f"param {key}={params[key]}: expected a value >= 0")
        tile_size, overlap = int(params.get("tile_size", 0)), int(params.get("overlap", 64))
        side = min(infer.tile_shape(self.model, tile_size))
        if params.get("mode") == "tiled" and 2 * overlap >= side:
            raise BadInput(f"param overlap={overlap}: must be below half the tile ({side} px), "
                           f"i.e. at most {(side - 1) // 2}")
        tiled = infer.TiledInferConfig(tile_size=tile_size, overlap=overlap,
                                       mode=params.get("blend", "average"),
                                       batch_size=int(self.config.get("tile_batch_size", 8)))
        settings = infer.Settings(mode=params.get("mode", "resize"), threshold=threshold, tiled=tiled,
                                  tta=bool(params.get("tta", False)),
                                  batch_size=int(self.config.get("batch_size", 8)),
                                  interpolation=self.config.get("interpolation", "area"))
        return settings, params.get("output", "mask"), params.get("on_error", "raise")

    def predict(self, context, model_input, params: dict | None = None):
        import pandas as pd

        settings, output, on_error = self.settings(params)
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            raise BadInput(f"expected a DataFrame with an '{INPUT_COLUMN}' column of encoded images")
        rows: list[dict] = [{"mask": b"", "height": 0, "width": 0, "pixels": [], "error": ""}
                            for _ in range(len(model_input))]
        images, index = [], []
        for i, value in enumerate(model_input[INPUT_COLUMN]):
            try:
                images.append(to_image(value, i))
                index.append(i)
            except SegMlopsError as exc:
                if on_error == "raise":
                    raise BadInput(str(exc)) from None
                rows[i]["error"] = str(exc)
        try:
            encoded = self.run(images, settings, output)
        except SegMlopsError as exc:
            raise BadInput(str(exc)) from None
        for i, row in zip(index, encoded):
            rows[i].update(row)
        if (params or {}).get("encoding") == "base64":  # for Spark: spark_udf has no binary result type
            for row in rows:
                row["mask"] = base64.b64encode(row["mask"]).decode("ascii")
        return pd.DataFrame(rows, columns=["mask", "height", "width", "pixels", "error"])

    def run(self, images: list[np.ndarray], settings: infer.Settings, output: str) -> list[dict]:
        """The encoded output of each decoded image."""
        palette = [tuple(c) for c in self.config["palette"]]
        classes = int(self.config.get("classes", 1))
        binary = classes == 1
        if output == "probabilities":
            masks = [infer.encode_probs(p) for p in infer.probabilities(self.model, images, settings)]
            labels = [None] * len(images)
        else:
            labels = infer.segment(self.model, images, settings)
            encode = (lambda lab: infer.encode_rgb(infer.colorize(lab, palette))) if output == "colorized" \
                else (lambda lab: infer.encode_mask(lab, palette, binary))
            masks = [encode(lab) for lab in labels]
        return [{"mask": mask, "height": image.shape[0], "width": image.shape[1],
                 "pixels": infer.class_pixels(lab, max(2, classes)) if lab is not None else []}
                for image, mask, lab in zip(images, masks, labels)]


def to_image(value: Any, i: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) from encoded image bytes or an RGB array; SegMlopsError names row i."""
    if isinstance(value, (bytes, bytearray)):
        return to_rgb(decode_bytes(bytes(value), f"image {i}"))
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3:
            raise SegMlopsError(f"image {i}: expected an HxWx3 uint8 RGB array, got {value.dtype} {value.shape}")
        return value
    raise SegMlopsError(f"image {i}: expected encoded image bytes (base64 over REST) or an HxWx3 uint8 "
                        f"array, got {type(value).__name__}")

