"""Benchmark of pruning in Optuna studies: how many more trials per hour does the median pruner
give, how many epochs does it save, and does the study still reach as good a value?

One job: run, in one process, two studies that differ only in tune.pruner ("median" vs "none"):
the same synthetic data, config, search space, seed and budget (tune.n_trials finished trials of
tune.epochs epochs each), every trial a real tracked training through seg_mlops.tuning.run_study
(MLflow child run, epoch-inference panels, log_model for trials that complete; the test split
is scored for each study's best trial only). Print, side by side: wall and CPU time, trials/hour,
epochs run and saved, pruned trials, the best val_dice_coef each study reached (and when), and
every trial. It asserts nothing.

Run from the repository root:

    python bench/tuning.py            # full run: 2 x 12 trials x 6 epochs, 8-15 minutes on 2 cores
    python bench/tuning.py --quick    # smoke check: 2 x 4 trials x 3 epochs, about 2.5 minutes
    python bench/tuning.py --epochs 15   # 12 trials x 15 epochs: longer trials, as real studies run
    python bench/tuning.py --trial-log trials.log   # either, keeping the trainings' Keras output

Everything (data, outputs, the MLflow sqlite store, the two Optuna journal files) lives in a
temporary folder, removed at the end; MLFLOW_TRACKING_URI points into it before anything runs.
The trainings' own stdout (Keras' per-epoch lines, the LR reducer) goes to --trial-log (default:
a file in the temporary folder); this script's figures are printed at the end.

Method. A 64 px binary synthetic dataset (seg_mlops.synthetic; 48/16/8 pairs, --quick 32/8/8), a
UNet with num_layers 4, batch 4, train.epoch_infer_count 2, train.patience 0 (no early stopping:
only the pruner ends a trial early), and tune.space searching model.base_filters [4, 8],
model.base_kernels [3, 5] and train.learning_rate in [1e-4, 3e-2] (log). The config's own values
(8, 3, 1e-3) lie inside the space, so run_study enqueues them as trial 0 of both studies. The
median pruner is tuning.make_pruner's: n_startup_trials=2, n_warmup_steps=tune.warmup_epochs=1 (no
trial is pruned before two have completed, nor before its second epoch). TPESampler(seed) draws its
first 10 trials at random from a seeded generator, so both studies propose the same parameters for
those trials (checked and printed); later TPE proposals depend on the trials' outcomes and may
differ. An untimed warm-up study (1 trial, 1 epoch) first creates the MLflow store and loads what a
process's first trial loads. The studies then run one after the other in a single launch each, not
in interleaved halves: a resumed launch builds a new TPESampler with the same seed, which re-draws
the random trials the first launch already ran (duplicates). Epochs run = the sum over trials of
len(trial.intermediate_values) (KerasPruningCallback reports every epoch, the pruned one included).
Epoch seconds come from the epoch_seconds metric MLflowLogger logs; a trial's remaining time (model
build, data checks, the MLflow run, evaluation, log_model) is its per-trial overhead. Trials/hour =
finished trials (complete or pruned) per hour of the launch's wall time (and per hour of this
process's CPU time, which other jobs' load affects less). Wall time is noisy when other jobs share
the CPU (the load average is printed); the epoch counts, pruned trials and best values do not
depend on it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # before any TensorFlow import

SIZE = 64
COUNTS = (48, 16, 8)
SPACE = {"model.base_filters": [4, 8], "model.base_kernels": [3, 5],
         "train.learning_rate": {"low": 1e-4, "high": 3e-2, "log": True}}
PRUNERS = ("median", "none")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_one(pruner: str, root: Path, tmp: Path, n_trials: int, epochs: int, log, name: str = "") -> dict:
    """One study launch; returns its trials (frozen), wall and CPU seconds, and per-trial epoch seconds."""
    from mlflow import MlflowClient

    from seg_mlops import config, tuning

    name = name or pruner
    experiment = f"bench_tuning_{name}"
    cfg = config.load(None, {
        "experiment": experiment, "data.root": str(root),
        "model.image_height": SIZE, "model.image_width": SIZE, "model.num_layers": 4,
        "model.base_filters": 8, "model.base_kernels": 3, "train.learning_rate": 1e-3,
        "train.batch_size": 4, "train.patience": 0, "train.epoch_infer_count": 2,
        "train.output_dir": str(tmp / "out" / name),
        "tune.space": SPACE, "tune.epochs": epochs, "tune.n_trials": n_trials, "tune.pruner": pruner,
        "tune.warmup_epochs": 1, "tune.sampler": "tpe", "tune.storage": str(tmp / f"{name}.journal")})
    launched, start, cpu = datetime.datetime.now(), time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(log):
        study = tuning.run_study(cfg)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    trials = study.get_trials(deepcopy=True)
    client = MlflowClient()
    epoch_s = {}
    for t in trials:
        run_id = t.user_attrs.get(tuning.RUN_ID_ATTR)
        history = client.get_metric_history(run_id, "epoch_seconds") if run_id else []
        epoch_s[t.number] = [m.value for m in sorted(history, key=lambda m: m.step)]
    return {"pruner": pruner, "trials": trials, "wall": wall, "cpu": cpu, "epoch_s": epoch_s,
            "direction": study.direction, "launched": launched}


def summarize(r: dict, epochs: int) -> dict:
    from optuna.trial import TrialState

    trials = r["trials"]
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    run = {t.number: len(t.intermediate_values) for t in trials}
    best = None
    if complete:
        pick = max if r["direction"].name == "MAXIMIZE" else min
        best = pick(complete, key=lambda t: t.value)
    overhead = {t.number: t.duration.total_seconds() - sum(r["epoch_s"][t.number])
                for t in done if t.duration is not None}
    return {"finished": len(done), "complete": complete, "pruned": pruned, "epochs_run": sum(run.values()),
            "budget_epochs": len(done) * epochs, "run": run, "best": best, "overhead": overhead,
            "trials_per_hour": 3600 * len(done) / r["wall"], "trials_per_cpu_hour": 3600 * len(done) / r["cpu"]}


def report(results: dict[str, dict], epochs: int) -> None:
    s = {p: summarize(results[p], epochs) for p in PRUNERS}
    med, none = s["median"], s["none"]

    print(f"\n{'':<40}{'pruner median':>16}{'pruner none':>16}")
    rows = [
        ("finished trials (complete + pruned)", lambda x, r: f"{x['finished']}"),
        ("  of which pruned", lambda x, r: f"{len(x['pruned'])}"),
        ("wall time", lambda x, r: f"{r['wall']:.0f} s"),
        ("CPU time (this process, all threads)", lambda x, r: f"{r['cpu']:.0f} s"),
        ("trials / hour (wall)", lambda x, r: f"{x['trials_per_hour']:.1f}"),
        ("trials / CPU hour", lambda x, r: f"{x['trials_per_cpu_hour']:.1f}"),
        ("epochs run", lambda x, r: f"{x['epochs_run']} / {x['budget_epochs']}"),
        ("epoch seconds (median)", lambda x, r: f"{statistics.median(v for e in r['epoch_s'].values() for v in e):.2f} s"),
        ("first epoch of a trial (median)", lambda x, r: f"{statistics.median(e[0] for e in r['epoch_s'].values() if e):.2f} s"),
        ("time in epochs 2+ (what pruning cuts)", lambda x, r: f"{sum(sum(e[1:]) for e in r['epoch_s'].values()):.0f} s"),
        ("time in first epochs (tracing)", lambda x, r: f"{sum(e[0] for e in r['epoch_s'].values() if e):.0f} s"),
        ("per-trial overhead, complete (median)", lambda x, r: _median_s([x['overhead'][t.number] for t in x['complete']])),
        ("per-trial overhead, pruned (median)", lambda x, r: _median_s([x['overhead'][t.number] for t in x['pruned']])),
        ("best val_dice_coef", lambda x, r: f"{x['best'].value:.4f}" if x["best"] else "-"),
        ("  reached by trial", lambda x, r: f"{x['best'].number}" if x["best"] else "-"),
        ("  reached after (wall)", lambda x, r: f"{_reached(x, r):.0f} s" if x["best"] else "-"),
    ]
    for label, cell in rows:
        print(f"{label:<40}{cell(med, results['median']):>16}{cell(none, results['none']):>16}")

    saved = none["epochs_run"] - med["epochs_run"]
    print(f"\ntrials/hour with pruning vs without: x{med['trials_per_hour'] / none['trials_per_hour']:.2f} (wall), "
          f"x{med['trials_per_cpu_hour'] / none['trials_per_cpu_hour']:.2f} (CPU)")
    print(f"epochs saved by pruning: {saved} of {none['epochs_run']} ({100 * saved / none['epochs_run']:.0f} %), "
          f"{len(med['pruned'])} pruned trials")
    if med["best"] and none["best"]:
        print(f"best value: {med['best'].value:.4f} with pruning vs {none['best'].value:.4f} without "
              f"({med['best'].value - none['best'].value:+.4f})")

    # Same seed: the first (random) trials must have the same parameters in both studies.
    a, b = results["median"]["trials"], results["none"]["trials"]
    same = 0
    for ta, tb in zip(a, b):
        if ta.params != tb.params:
            break
        same += 1
    print(f"same parameters in both studies: trials 0..{same - 1}"
          + (f"; trial {same} differs (TPE proposals follow the outcomes)" if same < min(len(a), len(b)) else ""))

    print("\nEvery trial: params, state, epochs run, best val_dice_coef, duration (s), seconds per epoch")
    for p in PRUNERS:
        print(f"  pruner {p}")
        for t in results[p]["trials"]:
            params = (f"f={t.params.get('model.base_filters', '-')} k={t.params.get('model.base_kernels', '-')} "
                      f"lr={t.params.get('train.learning_rate', float('nan')):.2e}")
            value = "-" if t.value is None else f"({t.value:.4f})" if t.state.name == "PRUNED" else f"{t.value:.4f}"
            duration = f"{t.duration.total_seconds():.0f}" if t.duration is not None else "-"
            print(f"    {t.number:>3}  {params:<26} {t.state.name:<9} {s[p]['run'][t.number]:>2} ep  {value:>8}"
                  f"  {duration:>5}s  [{' '.join(f'{e:.1f}' for e in results[p]['epoch_s'][t.number])}]")
    print("  (a pruned trial's value in brackets: the value Optuna stores for it, its last reported epoch's;"
          "\n  best_value counts complete trials only. Seconds per epoch: MLflow's epoch_seconds, the first"
          "\n  epoch includes graph tracing.)")


def _median_s(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} s" if values else "-"


def _reached(x: dict, r: dict) -> float:
    """Seconds from the call to run_study to the completion of the study's best trial."""
    return (x["best"].datetime_complete - r["launched"]).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (about 2.5 minutes)")
    parser.add_argument("--trials", type=int, default=None, help="finished trials per study (default 12, --quick 4)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 6, --quick 3)")
    parser.add_argument("--trial-log", type=Path, default=None,
                        help="file for the trainings' stdout (default: inside the temporary folder, removed)")
    args = parser.parse_args()
    counts, n_trials, epochs = ((32, 8, 8), 4, 3) if args.quick else (COUNTS, 12, 6)
    n_trials, epochs = args.trials or n_trials, args.epochs or epochs
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:.0f}s: {message}]", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="seg_mlops_tuning_bench_") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
        (tmp / "store").mkdir()
        try:
            import keras
            import mlflow
            import optuna
            import tensorflow as tf

            from seg_mlops import synthetic

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            print(f"bench/tuning.py{' --quick' if args.quick else ''}: {platform.node()}, "
                  f"{len(os.sched_getaffinity(0))} CPU cores usable, Python {platform.python_version()}, "
                  f"TensorFlow {tf.__version__}, Keras {keras.__version__}, MLflow {mlflow.__version__}, "
                  f"Optuna {optuna.__version__}; load average at the start {_load()}")
            root = synthetic.make_dataset(tmp / "data", size=SIZE, counts=counts, seed=0)
            print(f"\nUNet {SIZE} px, num_layers 4, batch 4, epoch_infer_count 2, patience 0; synthetic binary data "
                  f"{counts[0]}/{counts[1]}/{counts[2]} pairs; space {SPACE}; TPE seed 137; "
                  f"{n_trials} trials x {epochs} epochs per study; pruners: {', '.join(PRUNERS)}", flush=True)
            log_path = args.trial_log or tmp / "trials.log"
            results = {}
            with open(log_path, "w") as log:
                # Untimed warm-up (1 trial, 1 epoch, its own study): creates the MLflow store and
                # loads what a first trial loads (optuna_integration, evaluation, mlflow.keras), so
                # neither timed study pays once-per-process costs.
                progress("warm-up study: 1 trial x 1 epoch (not timed)")
                run_one("none", root, tmp, 1, 1, log, name="warmup")
                for pruner in PRUNERS:
                    progress(f"study with pruner {pruner}: {n_trials} trials x {epochs} epochs")
                    results[pruner] = run_one(pruner, root, tmp, n_trials, epochs, log)
                    progress(f"study with pruner {pruner} done in {results[pruner]['wall']:.0f}s "
                             f"(load average {_load()})")
            report(results, epochs)
            if args.trial_log:
                print(f"\ntrainings' output: {args.trial_log}")
        finally:
            os.environ.pop("MLFLOW_TRACKING_URI", None)

    print(f"\ntotal {time.perf_counter() - started:.0f}s; load average at the end {_load()} on "
          f"{len(os.sched_getaffinity(0))} cores (above the core count: something else was competing for the CPU)")


if __name__ == "__main__":
    main()
