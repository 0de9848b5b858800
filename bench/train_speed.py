"""Benchmark of training speed: float32 vs mixed precision vs mixed precision + XLA, and whether
the input pipeline (at full augmentation) keeps up with the model.

One job: measure and print, side by side in one run, training images/s of the seed Pap-Smear UNet
(configs/pap_smear.yaml: base_filters 16, base_kernels 9, dilation 3) at batch 2 and 8 in three
precisions, and the images/s of `seg_mlops.data.make_dataset` on the real
Herlev-PapSmear-SevereDysplastic training split with every augmentation op on (at bench/augment.py's
"full" probabilities). It asserts nothing.

    python bench/train_speed.py            # GPU: 512 px, 8 levels; CPU: 128 px, 6 levels (same 4x4 bridge)
    python bench/train_speed.py --quick    # fewer steps and rounds: a smoke check
    python bench/train_speed.py --size 512 --levels 8   # force the seed's shape

Method. Every variant is its own compiled model (same seed, same weights) trained by `model.fit`
on one fixed in-memory batch repeated (so the model's figure excludes the input pipeline); its
first epoch (tracing, XLA compilation) is a warm-up and is not timed. Rounds then run every
variant for `--steps` steps, alternating the order (A B C ... then ... C B A), timed from Keras'
on_epoch_begin to on_epoch_end. The pipeline is timed the same way: `--steps` global batches
pulled from the real pipeline (data.cache off: every image decoded, resized and augmented each
time). Mixed precision is mixed_float16 on a GPU and mixed_bfloat16 on a CPU (float16 matmuls have
no fast CPU kernels). Medians (best in brackets) per variant, the ratios to float32, and the ratio
pipeline img/s / model img/s (>1: the pipeline is not the bottleneck) are printed.
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = "Herlev-PapSmear-SevereDysplastic"


def data_dir() -> Path:
    base = os.environ.get("SEG_MLOPS_REAL_DATA")
    path = (Path(base) if base else REPO_ROOT.parent / "shared" / "data") / DATA
    if not path.is_dir():
        sys.exit(f"dataset not found: {path} (set SEG_MLOPS_REAL_DATA to the folder holding {DATA})")
    return path.resolve()


def full_augmentation() -> dict:
    """The one definition of "full augmentation" the benchmarks share (bench/augment.py's FULL)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_augment", Path(__file__).with_name("augment.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FULL


def cpu_name() -> str:
    """The CPU model and whether it has the bfloat16 instructions mixed_bfloat16 can use."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} (bfloat16 instructions: {', '.join(bf16) or 'none'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=0, help="image side (default: 512 on GPU, 128 on CPU)")
    parser.add_argument("--levels", type=int, default=0, help="UNet levels (default: 8 at 512 px, 6 at 128 px)")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 2, 1

    import keras
    import numpy as np
    import tensorflow as tf

    from seg_mlops import config, data, train
    from seg_mlops.model import build_unet

    gpu = bool(tf.config.list_physical_devices("GPU"))
    size = args.size or (512 if gpu else 128)
    levels = args.levels or (8 if size >= 512 else 6)
    mixed = "mixed_float16" if gpu else "mixed_bfloat16"
    base = config.load(REPO_ROOT / "configs" / "pap_smear.yaml", {
        "data.root": str(data_dir()), "model.image_height": size, "model.image_width": size,
        "model.num_layers": levels, "data.cache": "off"})
    variants = {"float32": ("float32", "off"), mixed: (mixed, "off"), f"{mixed}+XLA": (mixed, "on")}

    class EpochTimer(keras.callbacks.Callback):
        seconds = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self._start

    timer = EpochTimer()
    rng = np.random.default_rng(0)
    runs = {}  # (name, batch) -> callable returning images/s
    params = 0
    for batch in args.batches:
        x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
        y = (rng.uniform(size=(batch, size, size, 1)) > 0.7).astype(np.float32)
        for name, (policy, jit) in variants.items():
            cfg = config.override(base, {"train.mixed_precision": policy, "train.jit_compile": jit})
            keras.utils.set_random_seed(cfg.seed)
            with train.precision(policy):
                model = build_unet(**dataclasses.asdict(cfg.model))
            train.compile_model(model, cfg)
            params = model.count_params()
            ds = tf.data.Dataset.from_tensors((x, y)).repeat()

            def fit(model=model, ds=ds, batch=batch) -> float:
                model.fit(ds, epochs=1, steps_per_epoch=args.steps, verbose=0, shuffle=False, callbacks=[timer])
                return batch * args.steps / timer.seconds
            runs[(name, batch)] = fit

    full = full_augmentation()
    pipe_cfg = config.override(base, {f"augment.{k}": v for k, v in full.items()})
    augment_note = "full augmentation (bench/augment.py's FULL: every op, p = " + \
        ", ".join(f"{k} {v}" for k, v in full.items() if isinstance(v, float) and "_" not in k) + ")"
    pairs = data.split_pairs(pipe_cfg, "train")
    for batch in args.batches:
        def pipeline(batch=batch) -> float:
            # Repeated so that `steps` batches exist whatever the split size; rebuilt each round
            # so every image is decoded and augmented again (no cache).
            ds = data.make_dataset(pairs, pipe_cfg, batch_size=batch, shuffle=True, augment=True).repeat()
            start = time.perf_counter()
            count = sum(int(images.shape[0]) for images, _ in ds.take(args.steps))
            return count / (time.perf_counter() - start)
        runs[("pipeline", batch)] = pipeline

    if gpu:
        device = "GPU: " + tf.config.experimental.get_device_details(
            tf.config.list_physical_devices("GPU")[0]).get("device_name", "?")
    else:
        device = "CPU only: " + cpu_name()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {device}, {os.cpu_count()} cores")
    print(f"UNet {size}x{size}, {levels} levels, base_filters 16, base_kernels 9, dilation 3: {params:,} parameters")
    print(f"pipeline: {len(pairs)} train pairs of {DATA}, {augment_note}")
    print("warming up (tracing, XLA compilation) ...", flush=True)
    for run in runs.values():
        run()
    rates: dict = {key: [] for key in runs}
    order = list(runs)
    for r in range(args.rounds):
        for key in (order if r % 2 == 0 else order[::-1]):
            rates[key].append(runs[key]())
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    median = {key: statistics.median(v) for key, v in rates.items()}
    print(f"\nimages/s, median of {args.rounds} round(s) x {args.steps} steps [best]; ms per image; ratio to float32")
    for batch in args.batches:
        print(f"batch {batch}:")
        for name in variants:
            m = median[(name, batch)]
            print(f"  {name:22s} {m:8.2f} [{max(rates[(name, batch)]):.2f}]  {1000 / m:8.1f} ms/img  "
                  f"x{m / median[('float32', batch)]:.2f}   all: {' '.join(f'{v:.2f}' for v in rates[(name, batch)])}")
        best = max(variants, key=lambda n: median[(n, batch)])
        p = median[("pipeline", batch)]
        print(f"  {'pipeline alone':22s} {p:8.2f} [{max(rates[('pipeline', batch)]):.2f}]  "
              f"pipeline / fastest model ({best}) = {p / median[(best, batch)]:.1f}"
              f"   all: {' '.join(f'{v:.2f}' for v in rates[('pipeline', batch)])}")


if __name__ == "__main__":
    main()
