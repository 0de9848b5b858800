"""Benchmark of batch inference with the pipeline model: what do Spark and the pipeline cost next
to the bare forward pass?

One job: measure and print, side by side in one run, images/s of
  (a) `seg-mlops batch-infer --engine spark --master local[2]` (seg_mlops.batch: binaryFile read,
      MLflow's spark_udf, masks written by the executors), Spark already started,
  (b) `--engine local` (the same pipeline in this process, same batch size),
  (c) the raw batched forward pass: model.predict_on_batch over the same images resized and
      batched beforehand (no decoding, no resizing back, no encoding, no files),
the ratios a/b, a/c and b/c, Spark's one-off start (session, spark_udf, first partition: model
loaded in every Python worker), each engine's per-job cost (a job of 4 images: the model downloaded
and loaded, by every Python worker on Spark), and the per-image work of the pipeline split into decode, resize,
forward, resize back + threshold and PNG encode, as shares of the total. It asserts nothing.

Run from the repository root (needs the `spark` extra and Java 17):

    python bench/batch_infer.py            # 96 images of 512x384, 128 px model, 2 rounds
    python bench/batch_infer.py --quick    # 32 images, 1 round

Method. A binary UNet (random weights: speed does not depend on them; 128 px, 5 levels, 16
filters) is logged as a pipeline model into a throwaway sqlite store. Synthetic JPEG images are
written once. Each round runs a, b and c on fresh output folders (so nothing is skipped), in the
order a b c, then c b a. Spark runs local[2] (the 2 cores here); --engine local and the forward
pass use TensorFlow's own threads on the same cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # before any TensorFlow import

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
SMALL = 4  # images of the Spark job that measures the per-job cost


def make_images(folder: Path, count: int, width: int, height: int) -> list[Path]:
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    files = []
    for i in range(count):
        image = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (9, 9), 3)
        files.append(folder / f"img_{i:04d}.jpg")
        cv2.imwrite(str(files[-1]), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return files


def log_pipeline(tmp: Path, size: int):
    import mlflow

    from seg_mlops import config, serving
    from seg_mlops.model import build_unet

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    cfg = config.load(None, [f"model.image_height={size}", f"model.image_width={size}"])
    network = build_unet(image_height=size, image_width=size, num_layers=5, base_filters=16)
    with mlflow.start_run():
        return network, cfg, serving.log_pipeline(network, cfg)


def stages(network, files: list[Path], cfg) -> dict[str, float]:
    """Seconds per image of each step of infer.segment (resize mode), one batch at a time."""
    import numpy as np

    from seg_mlops import infer
    from seg_mlops.data import decode_bytes, resize_image, to_rgb

    size, totals = infer.model_size(network), dict.fromkeys(["decode", "resize", "forward", "resize back", "encode"], 0.0)
    batch = cfg.infer.batch_size
    for start in range(0, len(files), batch):
        chunk = [f.read_bytes() for f in files[start:start + batch]]
        t0 = time.perf_counter()
        images = [to_rgb(decode_bytes(b)) for b in chunk]
        t1 = time.perf_counter()
        x = np.stack([resize_image(img, size, cfg.data.image_interpolation) for img in images]).astype(np.float32)
        t2 = time.perf_counter()
        probs = infer.forward(network, x)
        t3 = time.perf_counter()
        labels = [infer.to_labels(infer.upsize(p, *img.shape[:2]), 0.5) for p, img in zip(probs, images)]
        t4 = time.perf_counter()
        [infer.encode_mask(lab, cfg.palette(), True) for lab in labels]
        t5 = time.perf_counter()
        for key, (a, b) in zip(totals, [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5)]):
            totals[key] += b - a
    return {k: v / len(files) for k, v in totals.items()}


def raw_forward(network, files: list[Path], batch: int) -> float:
    """images/s of predict_on_batch alone, on batches prepared beforehand."""
    import numpy as np

    from seg_mlops import infer
    from seg_mlops.data import read_rgb, resize_image

    size = infer.model_size(network)
    x = np.stack([resize_image(read_rgb(f), size) for f in files]).astype(np.float32)
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        network.predict_on_batch(x[i:i + batch])
    return len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 images, 1 round")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=128, help="model input (px)")
    parser.add_argument("--batch", type=int, default=16, help="images per pipeline call / Arrow batch")
    args = parser.parse_args()
    if args.quick:
        args.images, args.rounds = 32, 1

    from seg_mlops import batch

    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    files = make_images(tmp / "images", args.images, 512, 384)
    network, cfg, uri = log_pipeline(tmp, args.size)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.images} JPEG "
          f"images 512x384, model {args.size} px; pipeline {uri}")

    start = time.perf_counter()  # Spark's one-off start: session, spark_udf, model in every worker
    batch.run(uri, [str(tmp / "images")], tmp / "warm", engine="spark", master="local[2]", batch_size=args.batch)
    spark_start = time.perf_counter() - start
    network.predict_on_batch(__import__("numpy").zeros((args.batch, args.size, args.size, 3), "float32"))

    figures: dict[str, list[float]] = {"spark": [], "local": [], "forward": []}
    fixed: dict[str, list[float]] = {"spark": [], "local": []}  # seconds of a job of SMALL images
    small = tmp / "small"
    small.mkdir()
    for f in files[:SMALL]:
        (small / f.name).write_bytes(f.read_bytes())

    def once(variant: str, n: int) -> None:
        if variant == "forward":
            figures[variant].append(raw_forward(network, files, args.batch))
            return
        out = tmp / f"{variant}-{n}"
        r = batch.run(uri, [str(tmp / "images")], out, engine=variant, master="local[2]", batch_size=args.batch)
        assert r.written == len(files) and not r.failed, r
        figures[variant].append(len(files) / r.seconds)
        fixed[variant].append(batch.run(uri, [str(small)], tmp / f"small-{variant}-{n}", engine=variant,
                                        master="local[2]", batch_size=args.batch).seconds)

    for n in range(args.rounds):
        for variant in (["spark", "local", "forward"] if n % 2 == 0 else ["forward", "local", "spark"]):
            once(variant, n)
    med = {k: statistics.median(v) for k, v in figures.items()}
    print(f"first spark run (start + {args.images} images): {spark_start:.1f} s")
    for k, v in figures.items():
        print(f"{k:8s} images/s: median {med[k]:7.1f}  rounds {', '.join(f'{x:.1f}' for x in v)}")
    for engine in ("spark", "local"):  # model download and load (spark: in every Python worker)
        print(f"{engine} per-job cost (a job of {SMALL} images): {statistics.median(fixed[engine]):.1f} s")
    print(f"ratios of whole jobs: spark/local {med['spark'] / med['local']:.2f}, spark/forward {med['spark'] / med['forward']:.2f}, "
          f"local/forward {med['local'] / med['forward']:.2f}")
    per = stages(network, files, cfg)
    total = sum(per.values())
    print(f"pipeline per image: {total * 1000:.1f} ms = " + ", ".join(
        f"{k} {v * 1000:.1f} ms ({v / total:.0%})" for k, v in per.items()))
    overhead = total - per["forward"]
    print(f"overhead of the pipeline (decode, resize, resize back + threshold, encode): {overhead / total:.0%} of the total")


if __name__ == "__main__":
    main()
