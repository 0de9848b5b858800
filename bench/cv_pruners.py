"""Which Optuna pruner for cross-validated studies (tune.folds), measured on synthetic fold scores.

A CV trial reports one value per fold (its best monitored value, step = fold index) and may be
pruned between folds. Candidates: the median rule (MedianPruner, step = fold: a trial below the
median of the other trials on the same fold stops) and Optuna's WilcoxonPruner (a signed-rank test
of the trial against the best trial on the folds seen so far). No training: each trial's fold
scores are drawn as

    score[trial, fold] = quality[trial] + fold_effect[fold] + noise[trial, fold]

quality ~ N(0.70, 0.05) (a dice), a share of broken trials (learning rate that cannot learn) at
0.20, fold effects ~ N(0, 0.06) shared by every trial (the folds are the same seeded split for
all trials; small medical sets have folds of very different difficulty) and noise ~ N(0, 0.02).
Printed per pruner and k: the share of fold trainings spent (cost, 1.0 = no pruning), how many
broken trials were stopped before their last fold and how many folds each cost on average, how
often the truly best trial completed (it can be picked), and the regret (true quality of the best
possible trial minus that of the study's best trial). Pure Optuna, seconds on a CPU:

    python bench/cv_pruners.py [--reps 40] [--trials 30]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import optuna

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

PRUNERS = {
    "none": lambda: optuna.pruners.NopPruner(),
    "median (step=fold)": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    "wilcoxon p<0.1": lambda: optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=0),
    "wilcoxon p<0.25": lambda: optuna.pruners.WilcoxonPruner(p_threshold=0.25, n_startup_steps=0),
}


def scores(rng: np.random.Generator, trials: int, k: int, broken: float) -> tuple[np.ndarray, np.ndarray]:
    """(true quality per trial, score per trial and fold)."""
    quality = rng.normal(0.70, 0.05, trials)
    quality[rng.random(trials) < broken] = 0.20
    return quality, quality[:, None] + rng.normal(0, 0.06, k)[None, :] + rng.normal(0, 0.02, (trials, k))


def one_study(pruner, quality: np.ndarray, table: np.ndarray) -> dict[str, float]:
    study = optuna.create_study(direction="maximize", pruner=pruner)
    spent, broken_folds, broken_early = 0, [], 0
    k = table.shape[1]
    for t, row in enumerate(table):
        trial = study.ask()
        pruned = False
        for fold, value in enumerate(row):
            trial.report(float(value), fold)
            spent += 1
            if fold < k - 1 and trial.should_prune():
                pruned = True
                break
        if quality[t] == 0.20:
            broken_folds.append(fold + 1)
            broken_early += pruned
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, float(row.mean()))
    complete = [t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {"cost": spent / table.size,
            "broken_stopped": broken_early / max(len(broken_folds), 1),
            "broken_folds": float(np.mean(broken_folds)) if broken_folds else float("nan"),
            "best_kept": float(int(np.argmax(quality)) in complete),
            "regret": float(quality.max() - quality[study.best_trial.number])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--broken", type=float, default=0.2, help="share of trials that cannot learn")
    args = parser.parse_args()
    print(f"{args.reps} studies of {args.trials} trials each, {args.broken:.0%} broken; means over studies")
    print(f"{'k':>2} {'pruner':<20} {'cost':>6} {'broken stopped':>15} {'folds/broken':>13} "
          f"{'best kept':>10} {'regret':>8}")
    for k in (3, 5):
        for name, make in PRUNERS.items():
            rows = [one_study(make(), *scores(np.random.default_rng(rep), args.trials, k, args.broken))
                    for rep in range(args.reps)]
            mean = {key: float(np.nanmean([r[key] for r in rows])) for key in rows[0]}
            print(f"{k:>2} {name:<20} {mean['cost']:>6.2f} {mean['broken_stopped']:>15.0%} "
                  f"{mean['broken_folds']:>13.2f} {mean['best_kept']:>10.0%} {mean['regret']:>8.4f}")


if __name__ == "__main__":
    main()
