"""Benchmark of what `seg-mlops train` costs beyond the model itself, and of epoch-start stalls.

One job: train the same UNet on the same images with the same batch size and thread count
(a) as `seg-mlops train` does by default (tracking.train: MLflow run into a temporary sqlite
store, epoch-inference panels, best checkpoint, resume state, CSV/plots, the tf.data pipeline) and
(b) as a bare `keras.Model.fit` on in-memory NumPy arrays with no callback but a timer; print
every epoch's wall time and the time its first batch waited, and the ratio (a)/(b) of the median
epoch time (the first epoch, which traces and compiles, left out). It asserts nothing.

    python bench/overhead.py                     # 256 px and 128 px, 1 thread and all cores
    python bench/overhead.py --sizes 128 --threads 2 --epochs 3 --images 40
    python bench/overhead.py --quick             # 128 px only, 2 epochs, all cores

Method. The data are the first --images pairs of Herlev-PapSmear-SevereDysplastic's train split and
its 18 validation pairs, resized to --size; the model is the seed Pap-Smear UNet (base_filters 16,
base_kernels 9, dilation 3, dropout 0.03, bce_dice_loss, Adam 1e-4) with --levels levels (6: a
bridge of size/32), batch 2. (b) validates on the same validation arrays each epoch, so both sides
do the same forward/backward work and differ only in what seg_mlops adds. Each variant runs in its
own fresh Python process (TensorFlow's thread pools are fixed at start), with
intra-op = inter-op = --threads, in the order a b b a (machines are noisy). The time to first batch
is measured from Keras' on_epoch_begin to the first on_train_batch_begin: the gap in which Keras
makes the epoch's dataset iterator (where the stalls of issue 17 sat), plus on_train_batch_end of
batch 0 minus its begin (the first step, which includes waiting for the input pipeline's first
element).

With --split, variant (a) also reports where its epochs go: per callback, the seconds its hooks
took per epoch (every callback of Keras' CallbackList wrapped with a clock), and named parts inside
them (the panels' prediction and files, the composite picture, the copy of the variables for the
checkpoint and resume state, the history plots, and the background work, which overlaps training:
the checkpoint and state writes and the MLflow uploads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from train_speed import cpu_name, data_dir  # noqa: E402  (the benchmarks' one home for both)


def make_subset(root: Path, images: int) -> Path:
    """A data root holding links to the first `images` train pairs and all valid/test pairs."""
    for split in ("train", "valid", "test"):
        names = sorted(os.listdir(data_dir() / split / "images"))
        if split == "train":
            names = names[:images]
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
            for name in names:
                (root / split / kind / name).symlink_to(data_dir() / split / kind / name)
    return root


def config(root: Path, out: Path, size: int, levels: int, epochs: int, extra: list[str]):
    from seg_mlops import config as config_mod

    sets = {"experiment": "overhead", "seed": 137, "data.root": str(root), "data.binary_mask": "threshold",
            "model.image_height": size, "model.image_width": size, "model.num_layers": levels,
            "model.base_filters": 16, "model.base_kernels": 9, "model.dilation": 3, "model.dropout_rate": 0.03,
            "train.epochs": epochs, "train.batch_size": 2, "train.learning_rate": 1e-4,
            "train.loss": "bce_dice_loss", "train.metrics": ["dice_coef", "iou_coef", "image_dice"],
            "train.patience": 0, "train.output_dir": str(out)}
    sets.update(config_mod.parse_overrides(extra))
    return config_mod.load(None, overrides=sets)


def timer(spent: dict | None = None):
    """A Keras callback that records each epoch's wall time, the gap before its first batch
    (iterator creation) and its first step; with `spent` (see `instrument`), also a copy of it per
    epoch, which it then empties."""
    import keras

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs: list[dict] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.epochs.append({"begin": time.perf_counter()})

        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                self.epochs[-1]["first_batch_begin"] = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                self.epochs[-1]["first_batch_end"] = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epochs[-1]["end"] = time.perf_counter()
            if spent is not None:
                self.epochs[-1]["split"] = dict(spent)
                spent.clear()

        def rows(self) -> list[dict]:
            return [{"seconds": e["end"] - e["begin"], "to_first_batch": e["first_batch_begin"] - e["begin"],
                     "first_step": e["first_batch_end"] - e["first_batch_begin"], "split": e.get("split", {})}
                    for e in self.epochs]

    return Timer()


HOOKS = ("on_epoch_begin", "on_epoch_end", "on_train_batch_begin", "on_train_batch_end",
         "on_test_begin", "on_test_end", "on_test_batch_begin", "on_test_batch_end")


def _clocked(spent: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
    return wrapper


def instrument(spent: dict) -> None:
    """Clock every callback's hooks (as `<Class>`) and named parts inside ours (as `  <part>`)
    into `spent`, by wrapping Keras' CallbackList and a few functions of seg_mlops."""
    from keras.src.callbacks import callback_list

    from seg_mlops import callbacks, model_writer, resume, spool, tracking

    original_init = callback_list.CallbackList.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        for callback in self.callbacks:
            for hook in HOOKS:
                setattr(callback, hook, _clocked(spent, type(callback).__name__, getattr(callback, hook)))

    callback_list.CallbackList.__init__ = init
    parts = [(callbacks, "predict_probs", "panels: predict"), (callbacks, "panel", "panels: compose"),
             (callbacks, "write_rgb", "panels: PNG files"), (callbacks, "plot_history", "history: plots"),
             (tracking, "composite", "logger: composite"),
             (model_writer.ModelWriter, "snapshot", "checkpoint + state: copy the variables"),
             (resume.BestCheckpoint, "_write", "background: checkpoint write (overlaps)"),
             (resume.TrainingState, "_write_weights", "background: state weights (overlaps)"),
             (model_writer.ModelWriter, "_load", "background: load the copy (overlaps)"),
             (spool.RunSink, "_send", "background: upload (overlaps)")]
    for owner, attribute, name in parts:
        setattr(owner, attribute, _clocked(spent, "  " + name, getattr(owner, attribute)))


def run_seg_mlops(cfg, split: bool = False) -> list[dict]:
    """(a): the tracked training with its defaults; the timer is the last callback, so each epoch's
    time includes our callbacks' on_epoch_end work (panels, checkpoint, state, MLflow logging).
    With `split`, each row also has "split": {callback or part: seconds in that epoch}."""
    from seg_mlops import tracking

    spent: dict = {}
    if split:
        instrument(spent)
    clock = timer(spent if split else None)
    tracking.train(cfg, overwrite=True, extra_callbacks=[clock])
    return clock.rows()


def run_bare(cfg) -> list[dict]:
    """(b): the same model and data as NumPy arrays, plain fit, no callback but the timer."""
    import dataclasses

    import numpy as np

    from seg_mlops import data, model as model_mod, train as train_mod

    cfg, _ = data.prepare(cfg)
    arrays = {}
    for split in ("train", "valid"):
        pairs = [data.load_pair(p, cfg) for p in data.split_pairs(cfg, split)]
        arrays[split] = (np.stack([i for i, _ in pairs]).astype("float32"),
                         np.stack([m for _, m in pairs]).astype("float32")[..., None])
    import keras

    keras.utils.set_random_seed(cfg.seed)
    model = model_mod.build_unet(**dataclasses.asdict(cfg.model))
    train_mod.compile_model(model, cfg)
    clock = timer()
    model.fit(*arrays["train"], validation_data=arrays["valid"], batch_size=cfg.train.batch_size,
              epochs=cfg.train.epochs, shuffle=True, callbacks=[clock], verbose=0)
    return clock.rows()


def child(args) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        root = make_subset(Path(tmp) / "data", args.images)
        cfg = config(root, Path(tmp) / "out", args.size, args.levels, args.epochs, args.set)
        started = time.process_time()
        rows = run_seg_mlops(cfg, args.split) if args.child == "a" else run_bare(cfg)
        print("RESULT " + json.dumps({"rows": rows, "cpu": time.process_time() - started}), flush=True)


def launch(variant: str, size: int, threads: int, args, log) -> list[dict]:
    command = [sys.executable, __file__, "--child", variant, "--size", str(size), "--threads", str(threads),
               "--levels", str(args.levels), "--epochs", str(args.epochs), "--images", str(args.images)]
    command += [f"--set={item}" for item in args.set] + (["--split"] if args.split else [])
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
    log.write(done.stdout)
    found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not found:
        sys.exit(f"variant {variant} failed (rc {done.returncode}); last output:\n{done.stdout[-3000:]}")
    return json.loads(found[-1][len("RESULT "):])["rows"]


def report(size: int, threads: int, runs: dict[str, list[list[dict]]]) -> None:
    names = {"a": "seg-mlops train (defaults)", "b": "bare keras fit (arrays)"}
    medians, working = {}, {}
    print(f"\n== {size} px, {threads} thread(s)")
    for variant, repeats in runs.items():
        later = [row["seconds"] for rows in repeats for row in rows[1:]]
        medians[variant] = statistics.median(later)
        working[variant] = statistics.median(r["seconds"] - r["to_first_batch"] for rows in repeats for r in rows[1:])
        print(f"{names[variant]}: median epoch {medians[variant]:.2f} s (epochs after the first)")
        for i, rows in enumerate(repeats):
            cells = ", ".join(f"{r['seconds']:.1f} s (first batch after {r['to_first_batch']:.2f} s, "
                              f"first step {r['first_step']:.2f} s)" for r in rows)
            print(f"  run {i + 1}: {cells}")
        worst = max(r["to_first_batch"] for rows in repeats for r in rows[1:])
        print(f"  longest wait for a later epoch's first batch: {worst:.2f} s")
    print(f"ratio (a)/(b): {medians['a'] / medians['b']:.3f}; without the waits for the first batch "
          f"(either side): {working['a'] / working['b']:.3f}")
    split = [row["split"] for rows in runs["a"] for row in rows[1:] if row.get("split")]
    if split:
        print("(a) per epoch after the first, median [min-max] s, by callback (its hooks) and part:")
        for name in sorted({k for s in split for k in s}, key=lambda k: -statistics.median(s.get(k, 0) for s in split)):
            values = [s.get(name, 0.0) for s in split]
            print(f"  {name:<40} {statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--levels", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both variants, e.g. train.jit_compile=off")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--split", action="store_true", help="(a): time every callback and part of ours per epoch")
    parser.add_argument("--log", default=str(Path(tempfile.gettempdir()) / "bench_overhead.log"))
    parser.add_argument("--child", choices=("a", "b"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.threads = args.threads[0]
        return child(args)
    if args.quick:
        args.sizes, args.threads, args.epochs, args.images = [128], [os.cpu_count() or 1], 2, 20
    print(f"cpu: {cpu_name()}, {os.cpu_count()} cores; load average {os.getloadavg()}; overrides {args.set}; "
          f"log of the trainings: {args.log}")
    with open(args.log, "w") as log:
        for size in args.sizes:
            for threads in args.threads:
                runs: dict[str, list] = {"a": [], "b": []}
                for variant in ("a", "b", "b", "a"):
                    runs[variant].append(launch(variant, size, threads, args, log))
                report(size, threads, runs)


if __name__ == "__main__":
    main()
