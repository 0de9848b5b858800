"""Benchmark of MLflow tracking overhead: how much slower is an epoch of the same training when
it is tracked (per-epoch metrics and epoch-inference panels logged to MLflow) than when it is not?

One job: measure and print, side by side in one run, the wall time per epoch of the same UNet on
the same synthetic data (a) with tracking off: seg_mlops.train.train plain, which already writes
the checkpoint, the history CSV/PNG files and the epoch-inference panels to disk (training, not
tracking); (b) tracked into a local sqlite store: seg_mlops.tracking.train, i.e. the same inside
tracking.start_run with tracking.MLflowLogger as an extra callback (metrics, lr and epoch_seconds
each epoch, plus the 6 epoch-inference panels through mlflow.log_image); (c) tracked into a real
`mlflow server` on a free 127.0.0.1 port with proxied artifacts (what a team uses), which the
script starts and stops itself. Target: tracked epochs at most 3 % slower. It asserts nothing.

Run from the repository root:

    python bench/tracking_overhead.py              # full run, about 7 minutes on 2 CPU cores
    python bench/tracking_overhead.py --quick      # smoke check, about a minute
    python bench/tracking_overhead.py --no-server  # without variant (c)

Everything (data, outputs, stores, server) lives in a temporary folder, removed at the end.

Method. A 128 px binary synthetic dataset (seg_mlops.synthetic, 96/24/8 pairs) and a UNet with
base_filters 16, num_layers 5, batch 4, train.epoch_infer_count=6 in every variant, so the only
difference is MLflow. Trainings alternate off, sqlite, server, server, sqlite, off ... so drift on
a noisy machine hits every variant alike; each has a fresh output folder and starts after
keras.backend.clear_session(), with the same seed. An epoch is timed by a callback placed LAST in
the callback list: Keras calls callbacks in list order, so its on_epoch_end runs after every
other one's (checkpoint, history writer, epoch inference, the MLflow logger). The epoch time is
the interval from its on_epoch_end of epoch k-1 to its on_epoch_end of epoch k: that covers the
whole loop, every callback's on_epoch_begin and on_epoch_end included, and leaves out the first
epoch (graph tracing) by construction. Independently of machine noise, the MLflow logger's own
on_epoch_end is timed (a subclass), split into mlflow.log_metrics and mlflow.log_image (wrapped
while a tracked training runs). Once-per-run costs are printed apart: setup (call to
on_train_begin: start_run, tags, params) and end of run (on_train_end to return: best metric,
config, history files, log_model), against the same spans with tracking off. Test-split
evaluation (tracking.train's evaluate_test) is off: it is compute, not tracking.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # before any TensorFlow import

SIZE = 128
COUNTS = (96, 24, 8)
EXPERIMENT = "bench_tracking_overhead"
LABELS = {"off": "tracking off (train.train)", "sqlite": "tracked, local sqlite store",
          "server": "tracked, mlflow server (HTTP)"}


def _fmt(values: list[float], digits: int = 2) -> str:
    return " ".join(f"{v:.{digits}f}" for v in values)


def _pct(a: float, b: float) -> str:
    return f"{100 * (a - b) / b:+.1f} %"


# ----------------------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen | None, str, str]:
    """`mlflow server` over a fresh sqlite store with proxied artifacts, as `seg-mlops ui` starts
    it; returns (process or None, URI, note). Its output goes to home/server.log."""
    home.mkdir(parents=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server",
           "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
           "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            tail = (home / "server.log").read_text(errors="replace")[-1500:]
            return None, uri, f"mlflow server exited ({proc.returncode}):\n{tail}"
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as reply:
                if reply.status == 200:
                    return proc, uri, ""
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    return None, uri, "mlflow server did not answer /health within 120 s"


def stop_server(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers only
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ----------------------------------------------------------------------------- one training

def train_once(variant: str, cfg, uris: dict[str, str]) -> dict:
    """One training; returns its epoch intervals and the once-per-run spans (seconds)."""
    import keras
    import mlflow

    from seg_mlops import tracking
    from seg_mlops import train as train_mod

    class EpochTimer(keras.callbacks.Callback):
        """Must be the LAST callback: see the module docstring."""

        def __init__(self):
            super().__init__()
            self.intervals: list[float] = []
            self.cpu: list[float] = []
            self.last = self.last_cpu = None
            self.train_begin = self.train_end = 0.0

        def on_train_begin(self, logs=None):
            self.train_begin = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            now, cpu = time.perf_counter(), time.process_time()
            if self.last is not None:
                self.intervals.append(now - self.last)
                self.cpu.append(cpu - self.last_cpu)
            self.last, self.last_cpu = now, cpu

        def on_train_end(self, logs=None):
            self.train_end = time.perf_counter()

    timer = EpochTimer()
    spent = {"on_epoch_end": [], "log_metrics": [], "log_image": [], "log_model": []}
    inside = [False]  # log_metrics/log_image count only when called from the logger's on_epoch_end

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if inside[0] or key == "log_model":
                    spent[key][-1] += time.perf_counter() - start
        return wrapper

    original_logger = tracking.MLflowLogger

    class TimedLogger(original_logger):
        def on_epoch_end(self, epoch, logs=None):
            for key in ("on_epoch_end", "log_metrics", "log_image"):
                spent[key].append(0.0)
            inside[0], start = True, time.perf_counter()
            try:
                super().on_epoch_end(epoch, logs)
            finally:
                spent["on_epoch_end"][-1] = time.perf_counter() - start
                inside[0] = False

    keras.backend.clear_session()
    gc.collect()
    sink = io.StringIO()  # Keras' per-epoch lines and MLflow's "View run" line, alike in all variants
    start = time.perf_counter()
    if variant == "off":
        with contextlib.redirect_stdout(sink):
            result = train_mod.train(cfg, extra_callbacks=[timer])
    else:
        os.environ["MLFLOW_TRACKING_URI"] = uris[variant]
        patches = [(tracking, "MLflowLogger", TimedLogger),
                   (tracking, "log_model", timed("log_model", tracking.log_model)),
                   (mlflow, "log_metrics", timed("log_metrics", mlflow.log_metrics)),
                   (mlflow, "log_image", timed("log_image", mlflow.log_image))]
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
        spent["log_model"].append(0.0)
        try:
            for obj, name, value in patches:
                setattr(obj, name, value)
            with contextlib.redirect_stdout(sink):
                result, _ = tracking.train(cfg, extra_callbacks=[timer], evaluate_test=False)
        finally:
            for obj, name, value in saved:
                setattr(obj, name, value)
        if not spent["on_epoch_end"]:
            sys.exit("tracking.train did not use tracking.MLflowLogger: this benchmark needs updating")
    end = time.perf_counter()
    del result
    return {"intervals": timer.intervals, "cpu": timer.cpu, "setup": timer.train_begin - start,
            "teardown": end - timer.train_end, "logger": spent}


# ----------------------------------------------------------------------------- report

def report(runs: dict[str, list[dict]], epochs: int) -> None:
    variants = [v for v in LABELS if runs.get(v)]
    epoch_s = {v: [x for r in runs[v] for x in r["intervals"]] for v in variants}
    cpu_s = {v: [x for r in runs[v] for x in r["cpu"]] for v in variants}
    med = {v: statistics.median(epoch_s[v]) for v in variants}
    best = {v: min(epoch_s[v]) for v in variants}
    print(f"\nEpoch wall time, {len(runs['off'])} trainings per variant x {epochs - 1} timed epochs "
          f"(the first epoch of each training is not timed)")
    print(f"  {'variant':<32}{'median':>8}{'best':>8}{'CPU s':>8}   per training: median epoch seconds")
    for v in variants:
        per_run = [statistics.median(r["intervals"]) for r in runs[v]]
        print(f"  {LABELS[v]:<32}{med[v]:>7.2f}s{best[v]:>7.2f}s{statistics.median(cpu_s[v]):>7.2f}s   {_fmt(per_run)}")
    for v in variants[1:]:
        pairs = [statistics.median(t["intervals"]) / statistics.median(o["intervals"]) - 1
                 for t, o in zip(runs[v], runs["off"])]
        print(f"  overhead {v:<7} {_pct(med[v], med['off'])} (medians), {_pct(best[v], best['off'])} (bests), "
              f"{100 * statistics.median(pairs):+.1f} % (median of per-round pairs: "
              f"{' '.join(f'{100 * p:+.1f}' for p in pairs)})   [target <= +3 %]")
    print("  (CPU s: this process's CPU time per epoch, all threads; the server's own CPU is not in it)")

    print("\nInside MLflowLogger.on_epoch_end, per epoch (timed directly, epochs 2+; noise-independent)")
    print(f"  {'variant':<32}{'total':>9}{'metrics':>9}{'6 images':>10}{'% of off epoch':>16}   first epoch")
    for v in variants[1:]:
        parts = {k: [x for r in runs[v] for x in r["logger"][k][1:]] for k in ("on_epoch_end", "log_metrics", "log_image")}
        m = {k: 1000 * statistics.median(x) for k, x in parts.items()}
        first = statistics.median(r["logger"]["on_epoch_end"][0] for r in runs[v])
        print(f"  {LABELS[v]:<32}{m['on_epoch_end']:>7.0f}ms{m['log_metrics']:>7.0f}ms{m['log_image']:>8.0f}ms"
              f"{100 * m['on_epoch_end'] / 1000 / med['off']:>15.1f}%   {1000 * first:.0f}ms")

    print("\nOnce per run (medians; every run in brackets)")
    print(f"  {'variant':<32}{'setup':>8}{'end of run':>12}{'log_model':>11}")
    for v in variants:
        setup = [r["setup"] for r in runs[v]]
        tear = [r["teardown"] for r in runs[v]]
        model = f"{statistics.median(r['logger']['log_model'][0] for r in runs[v]):>10.2f}s" if v != "off" else "-"
        print(f"  {LABELS[v]:<32}{statistics.median(setup):>7.2f}s{statistics.median(tear):>11.2f}s{model:>11}"
              f"   [setup {_fmt(setup)}; end {_fmt(tear)}]")
    print("  setup = train call to on_train_begin (tracked adds start_run, tags incl. dataset fingerprint,"
          "\n  params); end of run = on_train_end to return (tracked adds best metric, config.yaml, history"
          "\n  files, log_model; both reload the best checkpoint)")


# ----------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (about a minute)")
    parser.add_argument("--no-server", action="store_true", help="skip the mlflow server variant")
    args = parser.parse_args()
    quick = args.quick
    # Full: 2 rounds (off sqlite server server sqlite off), 7 epochs each = 12 timed epochs per variant.
    counts, epochs, rounds = ((32, 8, 8), 3, 1) if quick else (COUNTS, 7, 2)
    started = time.perf_counter()

    import keras
    import mlflow
    import tensorflow as tf

    from seg_mlops import config, synthetic, tracking

    print(f"bench/tracking_overhead.py{' --quick' if quick else ''}: {platform.node()}, "
          f"{len(os.sched_getaffinity(0))} CPU cores usable, Python {platform.python_version()}, "
          f"TensorFlow {tf.__version__}, Keras {keras.__version__}, MLflow {mlflow.__version__}")

    with tempfile.TemporaryDirectory(prefix="seg_mlops_tracking_bench_") as tmp_name:
        tmp = Path(tmp_name)
        root = synthetic.make_dataset(tmp / "data", size=SIZE, counts=counts, seed=0)
        uris = {"sqlite": f"sqlite:///{tmp / 'store' / 'mlflow.db'}"}
        server = None
        if not args.no_server:
            print(f"[{time.perf_counter() - started:.0f}s: starting mlflow server ...]", file=sys.stderr, flush=True)
            server, uri, note = start_server(tmp / "server")
            if server is None:
                print(f"note: no server variant: {note}")
            else:
                uris["server"] = uri
        try:
            for variant, uri in uris.items():  # store creation / migrations: once, not timed
                os.environ["MLFLOW_TRACKING_URI"] = uri
                tracking.connect(EXPERIMENT)
            variants = ["off", *uris]
            print(f"\nUNet 128 px, base_filters 16, num_layers 5, batch 4; synthetic binary data "
                  f"{counts[0]}/{counts[1]}/{counts[2]} pairs; {epochs} epochs per training; "
                  f"epoch_infer_count 6 everywhere; variants: {', '.join(variants)}", flush=True)
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            count = 0
            for r in range(rounds):
                for variant in (variants if r % 2 == 0 else variants[::-1]):
                    count += 1
                    cfg = config.load(None, [
                        f"experiment={EXPERIMENT}", f"data.root={root}",
                        f"model.image_height={SIZE}", f"model.image_width={SIZE}",
                        "model.base_filters=16", "model.num_layers=5", "train.batch_size=4",
                        f"train.epochs={epochs}", "train.epoch_infer_count=6",
                        f"train.output_dir={tmp / 'out' / f'{count:02d}_{variant}'}"])
                    print(f"[{time.perf_counter() - started:.0f}s: training {count}/{rounds * len(variants)}, "
                          f"{variant} ...]", file=sys.stderr, flush=True)
                    runs[variant].append(train_once(variant, cfg, uris))
        finally:
            stop_server(server)
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        report(runs, epochs)

    print(f"\ntotal {time.perf_counter() - started:.0f}s; load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {len(os.sched_getaffinity(0))} cores "
          f"(above the core count: something else was competing for the CPU)")


if __name__ == "__main__":
    main()
