"""Benchmark of online augmentation: does augmenting every training sample inside tf.data
(seg_mlops.augment) keep training nearly as fast as without it?

One job: measure and print, side by side in one run, training images/s of the same compiled UNet
fed by seg_mlops.data.make_dataset without augmentation and with "full" augmentation (every op
enabled at reference-like probabilities, below), their ratio (target >= 0.8), and the augmented
pipeline alone (no model), on the real Herlev-PapSmear-SevereDysplastic train split at 128 px.
It asserts nothing: timings are for reading.

Run from the repository root:

    python bench/augment.py           # 6 interleaved rounds, a few minutes on 2 CPU cores
    python bench/augment.py --quick   # smoke check, about a minute

Data: ../shared/data/<Name> relative to the repository root, or $SEG_MLOPS_REAL_DATA/<Name>.

Method (as bench/pipeline.py). Both training pipelines use data.cache=memory, so file decoding
(identical in both) is paid once and the epochs compare augmentation against none. One model is
built and compiled; each variant runs one warm-up epoch (tracing, autotune; not timed), then
rounds alternate plain, augmented, pipeline-alone and the reverse order on the next round, so
drift on a noisy machine hits every variant alike. An epoch is timed from Keras' on_epoch_begin to
on_epoch_end. Medians, bests, the median of per-round ratios and CPU ms per image are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # before any TensorFlow import

DATA = "Herlev-PapSmear-SevereDysplastic"
BATCH = 8
SIZE = 128

# Every op on. The reference appended each enabled variant of a file to a pool and drew a batch
# from it, so a sample was most often the original or one variant; per-op probabilities of
# 0.5 (flips, right-angle rotations) and 0.25 (the rest) give a similar mix, with ops composed.
FULL = {
    "hflip": 0.5, "vflip": 0.5, "rotation": 0.5, "angles": [90, 180, 270],
    "shrink": 0.25, "shrinks": [0.8], "shear": 0.25, "shears": [0.1],
    "deformation": 0.25, "deformation_alpha": 1300, "deformation_sigmas": [8],
    "distortion": 0.25, "distortions": [0.02], "distortion_sigma": 40,
    "grid": 0.25, "barrel": 0.25, "barrel_radius": 0.3, "barrel_amount": 0.3,
    "barrel_centers": [[0.3, 0.3], [0.5, 0.5], [0.7, 0.7]],
    "pincushion": 0.25, "pincushion_radius": 0.3, "pincushion_amount": -0.3,
    "sharpening": 0.25, "brightening": 0.25,
}


def _timing():
    """bench/pipeline.py: its epoch timer, rate helpers, data_dir and formatting (one way to time)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_pipeline", Path(__file__).with_name("pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_PIPELINE = _timing()
data_dir, _fmt = _PIPELINE.data_dir, _PIPELINE._fmt


def measure(root: Path, *, max_images: int | None, rounds: int, base_filters: int) -> dict:
    """Images/s and CPU ms/image per variant, every timed epoch."""
    import keras

    from seg_mlops import config, data
    from seg_mlops.model import build_unet
    from seg_mlops.train import compile_model

    cfg = config.load(None, [
        f"data.root={root}", f"model.image_height={SIZE}", f"model.image_width={SIZE}",
        f"model.base_filters={base_filters}", "model.num_layers=5", "model.base_kernels=3",
        f"train.batch_size={BATCH}", "data.cache=memory"])
    augmented_cfg = config.override(cfg, {f"augment.{k}": v for k, v in FULL.items()})
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed)
    pairs = data.split_pairs(cfg, "train")[:max_images]
    n = len(pairs)
    plain = data.make_dataset(pairs, cfg, batch_size=BATCH, shuffle=True, augment=True)  # no op on
    augmented = data.make_dataset(pairs, augmented_cfg, batch_size=BATCH, shuffle=True, augment=True)
    assert plain.element_spec == augmented.element_spec

    model = build_unet(**dataclasses.asdict(cfg.model))
    compile_model(model, cfg)

    timing = _PIPELINE
    timer = timing.epoch_timer()

    def fit_epoch(ds) -> tuple[float, float]:
        return timing.fit_rate(model, ds, n, timer)

    variants = {"plain": lambda: fit_epoch(plain), "augmented": lambda: fit_epoch(augmented),
                "pipeline": lambda: timing.pipeline_rate(augmented)}
    for run in variants.values():  # warm-up (and the memory cache's one decoding epoch)
        run()
    rates: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            rate, cpu_ms = variants[name]()
            rates[name].append(rate)
            cpu[name].append(cpu_ms)
            print(f"  [round {r + 1}/{rounds}] {name}: {rate:.1f} images/s", file=sys.stderr, flush=True)
    return {"images": n, "params": model.count_params(), "rates": rates, "cpu": cpu,
            "base_filters": base_filters}


def report(result: dict) -> None:
    rates, cpu = result["rates"], result["cpu"]
    med = {k: statistics.median(v) for k, v in rates.items()}
    best = {k: max(v) for k, v in rates.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    paired = [a / p for a, p in zip(rates["augmented"], rates["plain"])]
    print(f"\n  model base_filters={result['base_filters']} ({result['params']:,} params), "
          f"{result['images']} images/epoch, {len(rates['plain'])} timed epochs per variant")
    print(f"  {'variant':<40}{'median':>8}{'best':>8}{'CPU ms/img':>12}   every epoch (images/s)")
    labels = {"plain": "train, no augmentation", "augmented": "train, full augmentation",
              "pipeline": "augmented pipeline alone, no model"}
    for key, label in labels.items():
        print(f"  {label:<40}{med[key]:>8.1f}{best[key]:>8.1f}{cpu_med[key]:>12.1f}   {_fmt(rates[key])}")
    print(f"  ratio augmented/plain: {med['augmented'] / med['plain']:.2f} (medians), "
          f"{best['augmented'] / best['plain']:.2f} (bests), {statistics.median(paired):.2f} "
          f"(median of per-round pairs: {' '.join(f'{p:.2f}' for p in paired)})   [target >= 0.8]")
    print(f"  CPU time per image plain/augmented: {cpu_med['plain'] / cpu_med['augmented']:.2f}")
    print(f"  augmented pipeline alone / training without augmentation: "
          f"{med['pipeline'] / med['plain']:.2f}x (> 1: augmentation outruns the model)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (about a minute)")
    parser.add_argument("--rounds", type=int, default=6, help="timed epochs per variant")
    parser.add_argument("--base-filters", type=int, default=16)
    args = parser.parse_args()
    root = data_dir(DATA)
    started = time.perf_counter()

    import cv2
    import keras
    import tensorflow as tf

    print(f"bench/augment.py{' --quick' if args.quick else ''}: {platform.node()}, "
          f"{len(os.sched_getaffinity(0))} CPU cores usable, Python {platform.python_version()}, "
          f"TensorFlow {tf.__version__}, Keras {keras.__version__}, OpenCV {cv2.__version__}, "
          f"GPUs: {len(tf.config.list_physical_devices('GPU'))}")
    print(f"\nTraining throughput, {root.name} train split, {SIZE} px, batch {BATCH}, "
          f"UNet num_layers=5 base_kernels=3, data.cache=memory; full augmentation = "
          + ", ".join(f"{k}={v}" for k, v in FULL.items()), flush=True)
    rounds, max_images = (2, 32) if args.quick else (args.rounds, None)
    report(measure(root, max_images=max_images, rounds=rounds, base_filters=args.base_filters))
    print(f"\ntotal {time.perf_counter() - started:.0f}s; load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {len(os.sched_getaffinity(0))} cores "
          f"(above the core count: something else was competing for the CPU)")


if __name__ == "__main__":
    main()
