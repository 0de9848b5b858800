"""Benchmark of MLflow tracking overhead: how much slower is an epoch of the same training when
it is tracked (per-epoch metrics and epoch-inference panels logged to MLflow) than when it is not?

One job: measure and print, side by side in one run, the wall time per epoch of the same UNet on
the same synthetic data (a) with tracking off: seg_mlops.train.train plain, which already writes
the checkpoint, the history CSV/PNG files and the epoch-inference panels to disk (training, not
tracking); (b) tracked into a local sqlite store: the same inside seg_mlops.tracking.start_run
with tracking.MLflowLogger as the panel logger (metrics, lr and epoch_seconds every epoch, plus
the 6 epoch-inference panels through mlflow.log_image), then what tracking.train logs at the end
(best metric, config, history files, the model; not its test-split evaluation, which is compute);
(c) the same into a real `mlflow server` on a free 127.0.0.1 port with proxied artifacts and its
default workers (what `seg-mlops ui` starts and a team uses), started and stopped by the script.
Target: tracked epochs at most 3 % slower than untracked ones. It asserts nothing.

Run from the repository root:

    python bench/tracking_overhead.py              # full run, about 7 minutes on 2 idle CPU cores
    python bench/tracking_overhead.py --quick      # smoke check, about 1.5 minutes
    python bench/tracking_overhead.py --no-server  # either, without variant (c)

Everything (data, outputs, stores, the server's store) lives in a temporary folder, removed at
the end; MLFLOW_TRACKING_URI is set per tracked training.

Method. A 128 px binary synthetic dataset (seg_mlops.synthetic; 96/24/8 pairs, --quick 32/8/8)
and a UNet with base_filters 16, num_layers 5, batch 4 and train.epoch_infer_count=6 in every
variant, so the only difference is MLflow. Trainings alternate off, sqlite, server, then server,
sqlite, off (2 rounds of 7 epochs; --quick: 1 round of 3), so drift on a noisy machine hits every
variant alike; each has a fresh output folder, the same seed, and starts after
keras.backend.clear_session(). An epoch is timed by a callback placed LAST in the callback list:
Keras calls callbacks in list order, so its on_epoch_end runs after every other one's
(checkpoint, history writer, epoch inference, the MLflow logger). The epoch time is the interval
from its on_epoch_end of epoch k-1 to its on_epoch_end of epoch k: that covers the whole loop,
every callback's on_epoch_begin and on_epoch_end included (a begin-to-end span of this last
callback would leave out the others' on_epoch_begin), and leaves out the first epoch (graph
tracing) by construction. The MLflow logger's own on_epoch_end is also timed directly (a
subclass), split into mlflow.log_metrics and mlflow.log_image (wrapped while a tracked training
runs): a per-epoch cost that machine noise barely affects. Once-per-run costs are printed apart:
setup (the call to on_train_begin: start_run, tags, params) and end of run (on_train_end to the
end of the run, log_model timed on its own).
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


def launch_server(home: Path) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` over a fresh sqlite store with proxied artifacts, as `seg-mlops ui`
    does (default workers), in its own session; returns at once. Output: home/server.log."""
    home.mkdir(parents=True)
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server",
           "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
           "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    with open(home / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_for_server(proc: subprocess.Popen, uri: str, log: Path, timeout: float = 180) -> str:
    """"" when the server answers /health, else why not."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            return f"mlflow server exited ({proc.returncode}):\n{log.read_text(errors='replace')[-1500:]}"
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as reply:
                if reply.status == 200:
                    return ""
        except OSError:
            time.sleep(0.5)
    return f"mlflow server did not answer /health within {timeout:.0f} s"


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

    from seg_mlops import config, losses, tracking
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

    spent: dict[str, list[float]] = {"on_epoch_end": [], "log_metrics": [], "log_image": [], "log_model": [0.0]}
    inside = [False]  # log_metrics / log_image count only when the logger's on_epoch_end calls them

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if inside[0]:
                    spent[key][-1] += time.perf_counter() - start
        return wrapper

    class TimedLogger(tracking.MLflowLogger):
        def on_epoch_end(self, epoch, logs=None):
            for key in ("on_epoch_end", "log_metrics", "log_image"):
                spent[key].append(0.0)
            inside[0], start = True, time.perf_counter()
            try:
                super().on_epoch_end(epoch, logs)
            finally:
                spent["on_epoch_end"][-1] = time.perf_counter() - start
                inside[0] = False

    timer = EpochTimer()
    keras.backend.clear_session()
    gc.collect()
    sink = io.StringIO()  # Keras' per-epoch lines and MLflow's "View run" line, alike in all variants
    start = time.perf_counter()
    if variant == "off":
        with contextlib.redirect_stdout(sink):
            result = train_mod.train(cfg, extra_callbacks=[timer])
    else:
        os.environ["MLFLOW_TRACKING_URI"] = uris[variant]
        saved = [(mlflow, "log_metrics", mlflow.log_metrics), (mlflow, "log_image", mlflow.log_image)]
        try:
            mlflow.log_metrics = timed("log_metrics", mlflow.log_metrics)
            mlflow.log_image = timed("log_image", mlflow.log_image)
            # What seg_mlops.tracking.train does, minus the test-split evaluation (compute, not tracking).
            with contextlib.redirect_stdout(sink), tracking.start_run(cfg, tags=tracking.run_tags(cfg)):
                tracking.log_params_once(config.flatten(cfg))
                result = train_mod.train(cfg, panel_logger=TimedLogger, extra_callbacks=[timer])
                values = result.history[cfg.train.monitor]
                best = (min if losses.monitor_mode(cfg.train.monitor) == "min" else max)(values)
                mlflow.log_metric(f"best_{cfg.train.monitor}", best)
                mlflow.log_text(config.to_yaml(cfg), "config.yaml")
                tracking.log_artifacts(result.output_dir, ["train_losses.csv", "train_losses.png",
                                                           "train_metrics.csv", "train_metrics.png"])
                model_start = time.perf_counter()
                tracking.log_model(result.model)
                spent["log_model"][0] = time.perf_counter() - model_start
        finally:
            for obj, name, value in saved:
                setattr(obj, name, value)
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
    cpu_med = {v: statistics.median(cpu_s[v]) for v in variants}
    print("  CPU s: this process's CPU time per epoch, all threads (others' load affects it less than wall"
          "\n  time); overhead in CPU time: " + ", ".join(f"{v} {_pct(cpu_med[v], cpu_med['off'])}" for v in variants[1:])
          + " (the server's own CPU is not in it)")

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
    print("  setup = from the call to on_train_begin (tracked: plus start_run, tags with the dataset"
          "\n  fingerprint, params); end of run = from on_train_end to the end (tracked: best metric,"
          "\n  config.yaml, history files, log_model, end_run)")


# ----------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (about a minute)")
    parser.add_argument("--no-server", action="store_true", help="skip the mlflow server variant")
    args = parser.parse_args()
    quick = args.quick
    # Full: 2 rounds (off sqlite server, server sqlite off), 7 epochs each: 12 timed epochs per variant.
    counts, epochs, rounds = ((32, 8, 8), 3, 1) if quick else (COUNTS, 7, 2)
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:.0f}s: {message}]", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="seg_mlops_tracking_bench_") as tmp_name:
        tmp = Path(tmp_name)
        server = None
        try:
            if not args.no_server:  # it starts (tens of seconds) while this process imports and prepares
                progress("starting mlflow server")
                server, server_uri = launch_server(tmp / "server")
            run_all(args, tmp, counts, epochs, rounds, server, server_uri if server else "", progress)
        finally:
            stop_server(server)
            os.environ.pop("MLFLOW_TRACKING_URI", None)

    print(f"\ntotal {time.perf_counter() - started:.0f}s; load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {len(os.sched_getaffinity(0))} cores "
          f"(above the core count: something else was competing for the CPU)")


def run_all(args, tmp: Path, counts, epochs: int, rounds: int, server, server_uri: str, progress) -> None:
    import keras
    import mlflow
    import tensorflow as tf

    from seg_mlops import config, synthetic, tracking

    print(f"bench/tracking_overhead.py{' --quick' if args.quick else ''}: {platform.node()}, "
          f"{len(os.sched_getaffinity(0))} CPU cores usable, Python {platform.python_version()}, "
          f"TensorFlow {tf.__version__}, Keras {keras.__version__}, MLflow {mlflow.__version__}")
    root = synthetic.make_dataset(tmp / "data", size=SIZE, counts=counts, seed=0)
    uris = {"sqlite": f"sqlite:///{tmp / 'store' / 'mlflow.db'}"}
    if server is not None:
        progress("waiting for the mlflow server")
        note = wait_for_server(server, server_uri, tmp / "server" / "server.log")
        if note:
            print(f"note: no server variant: {note}")
        else:
            uris["server"] = server_uri
    for uri in uris.values():  # store creation / migrations: once, not timed
        os.environ["MLFLOW_TRACKING_URI"] = uri
        tracking.connect(EXPERIMENT)
    variants = ["off", *uris]
    print(f"\nUNet {SIZE} px, base_filters 16, num_layers 5, batch 4; synthetic binary data "
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
            progress(f"training {count}/{rounds * len(variants)}, {variant}")
            runs[variant].append(train_once(variant, cfg, uris))
    report(runs, epochs)


if __name__ == "__main__":
    main()
