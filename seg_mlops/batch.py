"""Batch inference of image files with a pipeline model (serving.py): in this process, or on
Apache Spark through MLflow's own `mlflow.pyfunc.spark_udf`.

Inputs are folders (their images, as `seg-mlops infer` lists them) or globs (`slides/**/*.jpg`);
each image's mask goes to `<output>/<path relative to the folder, or to the glob's fixed
prefix>.png`. Masks already there are skipped, so a relaunch does only what is left; a mask is
written under a temporary name and renamed, so a killed job never leaves a half-written one. An
image the pipeline cannot decode is reported in `<output>/failed.csv` (path, reason) and the job
goes on. Spark reads the files with its own `binaryFile` source and scores them in parallel
partitions; executors write the masks, so on a cluster the images and the output folder must be
on a filesystem every executor reaches. The driver downloads the model (tracking server or
registry) and spark_udf ships it to the executors.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from seg_mlops.data import list_images
from seg_mlops.errors import SegMlopsError

# What spark_udf returns per image (the pipeline with encoding=base64: no binary result type).
RESULT_TYPE = "struct<mask: string, error: string>"
FAILED_FILE = "failed.csv"
PARTITION = 256  # most images per Spark partition


@dataclass
class Report:
    """What a batch job did: masks written, images skipped (mask already there), failures
    (path, reason), and seconds spent scoring."""

    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _glob_root(pattern: str) -> Path:
    """The part of a glob before its first wildcard: masks keep the paths below it."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[:next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))]]
    return Path(*fixed) if fixed else Path(".")


def plan(inputs: Sequence[str], output: str | Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths of every input image; one clear error when an input matches nothing or
    two images would write one mask."""
    output, pairs = Path(output), {}
    for spec in inputs:
        if Path(spec).is_dir():
            root, files = Path(spec), list_images(spec)
        else:
            root = _glob_root(spec)
            files = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
        if not files:
            raise SegMlopsError(f"--images {spec}: no images there (give a folder or a glob such as 'slides/**/*.jpg')")
        for f in files:
            mask = output / f.relative_to(root).with_suffix(".png")
            if mask in pairs and pairs[mask] != f.resolve():
                raise SegMlopsError(f"{f} and {pairs[mask]} would both write {mask}: rename one or score them apart")
            pairs[mask] = f.resolve()
    return [(image, mask) for mask, image in pairs.items()]


def write_mask(path: str | Path, data: bytes) -> None:
    """Write under a temporary name, then rename: a mask either exists whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    part.replace(path)


def run(model_uri: str, inputs: Sequence[str], output: str | Path, *, engine: str = "local",
        master: str = "local[*]", params: dict[str, Any] | None = None, batch_size: int = 16) -> Report:
    """Score every input image without a mask yet; writes the masks and failed.csv.

    Args:
        model_uri: a pipeline model (models:/seg-<dataset>@champion, runs:/..., a local folder).
        inputs: folders or globs.
        output: folder for the masks (and failed.csv).
        engine: "local" (this process) or "spark".
        master: the Spark master (local[*], spark://host:7077, yarn...), for engine="spark".
        params: inference params of the pipeline (mode, threshold, tta...).
        batch_size: images per pipeline call (local) / per Arrow batch (Spark).
    """
    pairs = plan(inputs, output)
    todo = [(image, mask) for image, mask in pairs if not mask.exists()]
    report = Report(skipped=len(pairs) - len(todo))
    params = {**(params or {}), "on_error": "report"}
    start = time.perf_counter()
    if todo:
        if engine == "local":
            report.failed = score_local(model_uri, todo, params, batch_size)
        elif engine == "spark":
            report.failed = score_spark(model_uri, todo, params, master, batch_size)
        else:
            raise SegMlopsError(f"engine={engine!r}: expected local or spark")
    report.seconds = time.perf_counter() - start
    report.written = len(todo) - len(report.failed)
    Path(output).mkdir(parents=True, exist_ok=True)
    with open(Path(output) / FAILED_FILE, "w", newline="") as f:
        csv.writer(f).writerows([("path", "reason"), *report.failed])
    return report


def _load(model_uri: str):
    import mlflow

    try:
        return mlflow.pyfunc.load_model(model_uri)
    except Exception as exc:  # MlflowException, OSError...: the user needs the URI and the reason
        raise SegMlopsError(f"cannot load model {model_uri}: {str(exc).splitlines()[0]}") from None


def score_local(model_uri: str, todo: Sequence[tuple[Path, Path]], params: dict, batch_size: int) -> list[tuple[str, str]]:
    """Score in this process, batch_size images per pipeline call; returns the failures."""
    import pandas as pd

    model, failed = _load(model_uri), []
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        out = model.predict(pd.DataFrame({"image": [image.read_bytes() for image, _ in chunk]}), params=params)
        for (image, mask), data, error in zip(chunk, out["mask"], out["error"]):
            if error:  # "cannot decode image 3: <reason>": the path names the image
                failed.append((str(image), error.split(": ", 1)[-1]))
            else:
                write_mask(mask, data)
    return failed


def _writer(targets: dict[str, str]):
    """The executors' side: write each partition's masks, yield its failures. Only the standard
    library and pandas inside (pickled by value: executors need no seg_mlops)."""
    def write(batches: Iterable):
        import base64
        import os
        import urllib.parse

        import pandas as pd

        for batch in batches:
            failed = []
            for path, mask, error in zip(batch["path"], batch["mask"], batch["error"]):
                source = urllib.parse.unquote(urllib.parse.urlparse(path).path)
                if error:
                    failed.append((source, error.split(": ", 1)[-1]))
                    continue
                target = targets[source]
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target + ".part", "wb") as f:
                    f.write(base64.b64decode(mask))
                os.replace(target + ".part", target)
            yield pd.DataFrame(failed, columns=["path", "reason"])
    return write


def score_spark(model_uri: str, todo: Sequence[tuple[Path, Path]], params: dict, master: str,
                batch_size: int) -> list[tuple[str, str]]:
    """Score on Spark: binaryFile read, repartitioned over the cores, the pipeline as a
    spark_udf, masks written by the executors; returns the failures."""
    import mlflow
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    if master.startswith("local"):  # Spark's Python workers: this environment, not `python3` on PATH
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (SparkSession.builder.master(master).appName("seg-mlops batch-infer")
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
             .config("spark.ui.enabled", "false").getOrCreate())
    try:
        udf = mlflow.pyfunc.spark_udf(spark, model_uri, result_type=RESULT_TYPE, env_manager="local",
                                      params={**params, "encoding": "base64"})
    except Exception as exc:
        raise SegMlopsError(f"cannot load model {model_uri}: {str(exc).splitlines()[0]}") from None
    targets = {str(image): str(mask) for image, mask in todo}
    # One partition per core (each Python worker loads the model once and keeps its traced batch
    # shapes), more for large jobs so a lost task or a slow executor costs at most PARTITION images.
    partitions = min(len(todo), max(spark.sparkContext.defaultParallelism, math.ceil(len(todo) / PARTITION)))
    scored = (spark.read.format("binaryFile").load([str(image) for image, _ in todo])
              .repartition(partitions)
              .select("path", udf(F.struct(F.col("content").alias("image"))).alias("out"))
              .select("path", "out.mask", "out.error"))
    rows = scored.mapInPandas(_writer(targets), "path string, reason string").collect()
    return sorted((row.path, row.reason) for row in rows)
