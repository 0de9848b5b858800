"""Benchmark of the input pipeline: does streaming from disk (seg_mlops.data.make_dataset) keep
training as fast as in-memory data, and how much RAM does it save over loading everything?

One job: measure and print, side by side in one run, (1) training images/s of the same compiled
UNet fed from the disk pipeline vs from in-memory tensors, plus the pipeline alone, on the real
Herlev-PapSmear-SevereDysplastic data at 128 px; (2) peak RSS of streaming every DSB2018-Nuclei
split through make_dataset at 256 px vs reading every image and mask into NumPy at original size,
each variant in its own fresh subprocess. It asserts nothing: timings are for reading.

Run from the repository root:

    python bench/pipeline.py           # full run, a few minutes on 2 CPU cores
    python bench/pipeline.py --quick   # smoke check, under about a minute

Data: ../shared/data/<Name> relative to the repository root, or $SEG_MLOPS_REAL_DATA/<Name>.

Method. Part 1 builds the model once per size, compiles it with seg_mlops.train.compile_model, runs
one warm-up epoch per variant (tracing, autotune warm-up; not timed), then alternates one-epoch
fits disk, memory, pipeline-alone and the reverse order on the next round, so drift on a noisy
machine hits every variant alike. An epoch is timed from Keras' on_epoch_begin to on_epoch_end,
which includes creating the dataset iterator and filling its first batch (a real per-epoch cost)
but not fit()'s own setup. Medians (and bests) per variant are printed with every epoch's figure.
Part 2 reads ru_maxrss (KiB on Linux) in each child: once right after importing TensorFlow and
seg_mlops (the baseline) and once after the work (the peak).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # before any TensorFlow import, here and in the children

REPO_ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT_DATA = "Herlev-PapSmear-SevereDysplastic"
MEMORY_DATA = "DSB2018-Nuclei"
BATCH = 8
SIZE_PART1 = 128
SIZE_PART2 = 256


def epoch_timer():
    """A Keras callback that keeps the wall and CPU seconds of the last epoch (shared by the benches)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        seconds = cpu = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._start, self._cpu = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self._start
            self.cpu = time.process_time() - self._cpu

    return EpochTimer()


def fit_rate(model, ds, n: int, timer) -> tuple[float, float]:
    """One training epoch over `ds` (n images): (images/s of wall time, CPU ms per image)."""
    model.fit(ds, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
    return n / timer.seconds, 1000 * timer.cpu / n


def pipeline_rate(ds) -> tuple[float, float]:
    """One pass of the input pipeline alone: (images/s of wall time, CPU ms per image)."""
    start, cpu = time.perf_counter(), time.process_time()
    count = sum(int(batch_images.shape[0]) for batch_images, _ in ds)
    return count / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / count


def data_dir(name: str) -> Path:
    base = os.environ.get("SEG_MLOPS_REAL_DATA")
    path = (Path(base) if base else REPO_ROOT.parent / "shared" / "data") / name
    if not path.is_dir():
        sys.exit(f"dataset not found: {path} (set SEG_MLOPS_REAL_DATA to the folder holding {name})")
    return path.resolve()


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.1f}" for v in values)


def _fmt2(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


# ----------------------------------------------------------------------------- part 1: throughput

def throughput(root: Path, base_filters: int, *, max_images: int | None, rounds: int) -> dict:
    """Images/s of one model fed from disk vs from memory, and of the disk pipeline alone."""
    import keras
    import numpy as np
    import tensorflow as tf

    from seg_mlops import config, data
    from seg_mlops.model import build_unet
    from seg_mlops.train import compile_model

    cfg = config.load(None, [
        f"data.root={root}", f"model.image_height={SIZE_PART1}", f"model.image_width={SIZE_PART1}",
        f"model.base_filters={base_filters}", "model.num_layers=5", "model.base_kernels=3",
        f"train.batch_size={BATCH}"])
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed)
    pairs = data.split_pairs(cfg, "train")[:max_images]
    n = len(pairs)

    # (a) the real streamed pipeline; (b) the same pairs decoded once, then held as tensors.
    disk = data.make_dataset(pairs, cfg, batch_size=BATCH, shuffle=True)
    # (c) the same pipeline with data.cache: decoded once (first epoch), then from memory.
    cached = data.make_dataset(pairs, config.override(cfg, {"data.cache": "memory"}), batch_size=BATCH, shuffle=True)
    decoded = [data.load_pair(p, cfg) for p in pairs]
    images = np.stack([image for image, _ in decoded]).astype(np.float32)
    targets = np.stack([labels for _, labels in decoded]).astype(np.float32)[..., None]
    memory = (tf.data.Dataset.from_tensor_slices((images, targets))
              .shuffle(n, seed=cfg.seed, reshuffle_each_iteration=True)
              .batch(BATCH).prefetch(tf.data.AUTOTUNE))
    assert disk.element_spec == memory.element_spec, (disk.element_spec, memory.element_spec)

    model = build_unet(**dataclasses.asdict(cfg.model))
    compile_model(model, cfg)

    timer = epoch_timer()

    # Each returns (images/s of wall time, CPU ms of this process, all threads, per image).
    def fit_epoch(ds) -> tuple[float, float]:
        return fit_rate(model, ds, n, timer)

    variants = {"disk": lambda: fit_epoch(disk), "memory": lambda: fit_epoch(memory),
                "cached": lambda: fit_epoch(cached), "pipeline": lambda: pipeline_rate(disk)}
    for run in variants.values():  # warm-up, not timed
        run()
    rates: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)  # disk and memory stay adjacent in both orders: a round is a fair pair
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            rate, cpu_ms = variants[name]()
            rates[name].append(rate)
            cpu[name].append(cpu_ms)
    return {"base_filters": base_filters, "images": n, "params": model.count_params(),
            "rates": rates, "cpu": cpu}


def print_throughput(result: dict) -> None:
    rates, cpu = result["rates"], result["cpu"]
    med = {k: statistics.median(v) for k, v in rates.items()}
    best = {k: max(v) for k, v in rates.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    paired = [d / m for d, m in zip(rates["disk"], rates["memory"])]
    print(f"\n  model base_filters={result['base_filters']} ({result['params']:,} params), "
          f"{result['images']} images/epoch, {len(rates['disk'])} timed epochs per variant")
    print(f"  {'variant':<34}{'median':>8}{'best':>8}{'CPU ms/img':>12}   every epoch (images/s)")
    labels = {"disk": "train from disk (make_dataset)", "memory": "train from memory (tensors)",
              "cached": "train from disk, data.cache=memory", "pipeline": "disk pipeline alone, no model"}
    for key, label in labels.items():
        print(f"  {label:<34}{med[key]:>8.1f}{best[key]:>8.1f}{cpu_med[key]:>12.1f}   {_fmt(rates[key])}")
    print(f"  ratio disk/memory: {med['disk'] / med['memory']:.2f} (medians), "
          f"{best['disk'] / best['memory']:.2f} (bests), {statistics.median(paired):.2f} "
          f"(median of per-round pairs: {_fmt2(paired)})   [target >= 0.9]")
    print(f"  ratio cached/memory: {med['cached'] / med['memory']:.2f} (medians)   [target >= 0.9]")
    print(f"  CPU time per image memory/disk: {cpu_med['memory'] / cpu_med['disk']:.2f} (what the ratio "
          f"tends to when the model alone keeps every core busy; less sensitive to other load)")
    print(f"  pipeline alone / training from memory: {med['pipeline'] / med['memory']:.2f}x "
          f"(> 1: the pipeline alone outruns the model)")


# ----------------------------------------------------------------------------- part 2: memory

def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _vmhwm_kib() -> int:
    """The same peak from /proc (0 where there is none): a cross-check of ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_child(mode: str, root: Path, splits: list[str]) -> None:
    """Runs in a fresh process: do one variant, print its RSS figures as one JSON line."""
    import numpy as np
    import tensorflow as tf  # noqa: F401  (both variants pay for it: it is the baseline)

    from seg_mlops import config, data

    baseline, baseline_hwm = _maxrss_kib(), _vmhwm_kib()
    start = time.perf_counter()
    count, held = 0, 0
    if mode == "stream":
        cfg = config.load(None, [f"data.root={root}", f"model.image_height={SIZE_PART2}",
                                 f"model.image_width={SIZE_PART2}"])
        for split in splits:
            ds = data.make_dataset(data.split_pairs(cfg, split), cfg, batch_size=BATCH,
                                   shuffle=split == "train")
            for batch_images, _ in ds:
                count += int(batch_images.shape[0])
    elif mode == "numpy":
        # The reference's way: every image and mask read into RAM at original size. Masks are kept
        # as uint8 label maps (1 byte/px), the most compact form, so this figure is a lower bound.
        cfg = config.load(None, [f"data.root={root}"])
        images: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        for split in splits:
            for pair in data.split_pairs(cfg, split):
                images.append(data.read_rgb(pair.image))
                masks.append(data.encode_mask(data.read_rgb(pair.mask), cfg.data, 1, str(pair.mask)))
        count = len(images)
        held = sum(a.nbytes for a in images) + sum(a.nbytes for a in masks)
    else:
        raise SystemExit(f"unknown child mode {mode!r}")
    print("RESULT " + json.dumps({"mode": mode, "baseline_kib": baseline, "peak_kib": _maxrss_kib(),
                                  "baseline_hwm_kib": baseline_hwm, "peak_hwm_kib": _vmhwm_kib(),
                                  "images": count, "held_bytes": held,
                                  "seconds": time.perf_counter() - start}), flush=True)


def run_memory_child(mode: str, root: Path, splits: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", mode,
           "--_root", str(root), "--_splits", ",".join(splits)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"memory child {mode!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def print_memory(results: dict[str, list[dict]], splits: list[str]) -> None:
    mib = 1024.0
    med = {m: {k: statistics.median(r[k] for r in runs) for k in ("baseline_kib", "peak_kib", "seconds")}
           for m, runs in results.items()}
    labels = {"stream": f"stream make_dataset at {SIZE_PART2} px", "numpy": "NumPy, original size"}
    print(f"  splits: {', '.join(splits)}; {results['stream'][0]['images']} pairs; "
          f"{len(results['stream'])} run(s) per variant (medians; every run in brackets)")
    print(f"  {'variant':<32}{'baseline':>10}{'peak':>10}{'increment':>11}{'time':>8}")
    for mode, label in labels.items():
        m = med[mode]
        peaks = ", ".join(f"{r['peak_kib'] / mib:.0f}" for r in results[mode])
        print(f"  {label:<32}{m['baseline_kib'] / mib:>7.0f} MiB{m['peak_kib'] / mib:>6.0f} MiB"
              f"{(m['peak_kib'] - m['baseline_kib']) / mib:>7.0f} MiB{m['seconds']:>7.1f}s   [peaks {peaks}]")
    held = results["numpy"][0]["held_bytes"] / 2**20
    inc_s = med["stream"]["peak_kib"] - med["stream"]["baseline_kib"]
    inc_n = med["numpy"]["peak_kib"] - med["numpy"]["baseline_kib"]
    print(f"  NumPy arrays held: {held:.0f} MiB (images RGB uint8 + masks uint8 labels)")
    worst = max(abs(r["peak_hwm_kib"] - r["peak_kib"]) for runs in results.values() for r in runs)
    print(f"  cross-check: VmHWM from /proc/self/status differs from ru_maxrss by at most {worst / mib:.0f} MiB")
    print(f"  peak RSS ratio numpy/stream: {med['numpy']['peak_kib'] / med['stream']['peak_kib']:.2f}; "
          f"increment over baseline ratio: {inc_n / max(inc_s, 1):.1f}")


# ----------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (under about a minute)")
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    parser.add_argument("--_root", help=argparse.SUPPRESS)
    parser.add_argument("--_splits", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, Path(args._root), args._splits.split(","))
        return

    quick = args.quick
    herlev, dsb = data_dir(THROUGHPUT_DATA), data_dir(MEMORY_DATA)
    started = time.perf_counter()

    # Part 2's children run first, while this process is still small: on Linux a child's
    # ru_maxrss starts from the RSS of the process it was forked from (the fork's copy of the
    # parent's pages counts until exec), so forking them from a parent that holds TensorFlow and
    # a model would report the parent's size, not the child's.
    splits = ["test"] if quick else ["train", "valid", "test"]
    order = ["stream", "numpy"] if quick else ["stream", "numpy", "numpy", "stream"]
    memory: dict[str, list[dict]] = {"stream": [], "numpy": []}
    for mode in order:
        print(f"[part 2: {mode} child ...]", file=sys.stderr, flush=True)
        memory[mode].append(run_memory_child(mode, dsb, splits))

    import cv2
    import keras
    import tensorflow as tf

    print(f"bench/pipeline.py{' --quick' if quick else ''}: {platform.node()}, "
          f"{len(os.sched_getaffinity(0))} CPU cores usable, Python {platform.python_version()}, "
          f"TensorFlow {tf.__version__}, Keras {keras.__version__}, OpenCV {cv2.__version__}, "
          f"GPUs: {len(tf.config.list_physical_devices('GPU'))}")

    print(f"\nPart 1 - training throughput, {herlev.name} train split, {SIZE_PART1} px, batch {BATCH}, "
          f"UNet num_layers=5 base_kernels=3", flush=True)
    sizes, rounds, max_images = ((8,), 2, 32) if quick else ((8, 16), 8, None)
    for base_filters in sizes:
        print_throughput(throughput(herlev, base_filters, max_images=max_images, rounds=rounds))

    print(f"\nPart 2 - peak RSS (ru_maxrss), {dsb.name}, each run in a fresh subprocess; "
          f"baseline = after importing TensorFlow + seg_mlops")
    print_memory(memory, splits)
    print(f"\ntotal {time.perf_counter() - started:.0f}s; load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {len(os.sched_getaffinity(0))} cores "
          f"(above the core count: something else was competing for the CPU)")


if __name__ == "__main__":
    main()
