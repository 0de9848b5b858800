"""Paired comparison of two models on the same test images.

The statistics on hand-made score arrays (known intervals and p-values), then `seg-mlops compare`
on real tiny runs: a run against its own registered version (difference exactly 0), a model that
predicts nothing against a trained one (clearly significant), a config on other data (refused in
one line, --force overrides), and a study's seeded trial against its best trial (--study).
"""

from __future__ import annotations

import csv
import io

import keras
import mlflow
import numpy as np
import pytest
from click.testing import CliRunner

from seg_mlops import config, paired, registry, synthetic, tracking
from seg_mlops.cli import cli
from tests.conftest import TINY

# ----------------------------------------------------------------------------- statistics


def test_identical_scores_give_the_interval_0_0_and_no_decision():
    a = np.random.default_rng(0).uniform(0.2, 0.9, 30)
    s = paired.compare(a, a.copy(), seed=1)
    assert (s.n, s.skipped, s.difference, s.ci_low, s.ci_high, s.p_value) == (30, 0, 0.0, 0.0, 0.0, 1.0)
    assert s.mean_a == s.mean_b == pytest.approx(a.mean())
    assert not s.b_better and not s.a_better
    assert s.verdict == "no significant difference (the interval contains 0)"


def test_a_constant_shift_is_significant_both_ways():
    a = np.random.default_rng(1).uniform(0.2, 0.8, 20)
    up = paired.compare(a, a + 0.1)
    assert up.difference == pytest.approx(0.1)
    assert (up.ci_low, up.ci_high) == pytest.approx((0.1, 0.1))
    assert up.b_better and up.verdict == "B is better (the whole interval is above 0)"
    assert up.p_value < 1e-4  # 20 differences, all positive
    down = paired.compare(a + 0.1, a)
    assert (down.ci_low, down.ci_high) == pytest.approx((-0.1, -0.1))
    assert down.a_better and not down.b_better and down.verdict.startswith("A is better")


def test_wilcoxon_p_is_the_exact_signed_rank_p():
    # 6 distinct positive differences: of the 2**6 sign patterns only "all +" and "all -" are as
    # extreme, so the exact two-sided p is 2/64.
    s = paired.compare(np.zeros(6), np.arange(1, 7) / 100)
    assert s.p_value == pytest.approx(2 / 64)
    assert s.difference == pytest.approx(0.035)


def test_bootstrap_is_seeded_and_its_interval_brackets_the_mean():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.3, 0.9, 40), rng.uniform(0.3, 0.9, 40)
    first, again = paired.compare(a, b, seed=7), paired.compare(a, b, seed=7)
    assert (first.ci_low, first.ci_high) == (again.ci_low, again.ci_high)  # same seed, same interval
    other = paired.compare(a, b, seed=8)
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)
    d = b - a
    assert d.min() < first.ci_low < d.mean() < first.ci_high < d.max()
    wider = paired.compare(a, b, seed=7, confidence=0.99)
    assert wider.ci_low < first.ci_low and wider.ci_high > first.ci_high
    # Not a multiple of the resampling block: still `resamples` means (same interval when seeded).
    assert paired.bootstrap_interval(d, 0.95, 2500, 3) == paired.bootstrap_interval(d, 0.95, 2500, 3)


def test_two_values_give_the_interval_of_their_resample_means():
    # Differences (0, 1): resample means are 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so
    # the 2.5% and 97.5% percentiles are 0 and 1: an interval containing 0, not significant.
    s = paired.compare([0.5, 0.5], [0.5, 1.5])
    assert (s.ci_low, s.ci_high) == (0.0, 1.0) and not s.b_better


def test_unscored_images_are_skipped_and_too_few_pairs_decide_nothing():
    s = paired.compare([np.nan, 0.5, 0.6], [np.nan, 0.7, 0.6])
    assert (s.n, s.skipped) == (2, 1)
    assert (s.mean_a, s.mean_b, s.difference) == pytest.approx((0.55, 0.65, 0.1))
    one = paired.compare([np.nan, 0.5], [np.nan, 0.9])
    assert one.n == 1 and np.isnan(one.ci_low) and not one.b_better
    assert one.verdict.startswith("not decided: 1 independent image group(s) paired")
    with pytest.raises(ValueError, match="two 1-D arrays of one length"):
        paired.compare([0.1, 0.2], [0.1])


def test_copies_of_one_image_count_once_when_grouped():
    # 4 distinct images, each present 5 times (rotated copies, say): resampling whole groups gives
    # exactly the 4 images' interval and p (equal group sizes: the same seeded draws); resampling
    # the 20 copies as if independent makes the interval narrower than the evidence allows.
    a, b = np.array([0.6, 0.7, 0.5, 0.8]), np.array([0.7, 0.65, 0.7, 0.8])
    distinct = paired.compare(a, b, seed=3)
    copies = paired.compare(np.repeat(a, 5), np.repeat(b, 5), seed=3, groups=np.repeat(list("wxyz"), 5))
    assert (copies.n, copies.groups, distinct.groups) == (20, 4, 4)
    assert (copies.ci_low, copies.ci_high) == pytest.approx((distinct.ci_low, distinct.ci_high), abs=1e-12)
    assert copies.p_value == pytest.approx(distinct.p_value)
    naive = paired.compare(np.repeat(a, 5), np.repeat(b, 5), seed=3)
    assert naive.ci_high - naive.ci_low < 0.6 * (copies.ci_high - copies.ci_low)
    # unequal groups: a resample's mean is its differences' sum over its image count; with two
    # groups {+1, +1} and {0} the resample means are 1 (gg), 2/3 (gh, hg) and 0 (hh)
    two = paired.compare([0, 0, 0], [1, 1, 0], groups=["g", "g", "h"], resamples=4000, seed=0)
    assert (two.ci_low, two.ci_high) == (0.0, 1.0) and two.difference == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- compare command

def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def table(output: str) -> dict[str, str]:
    """The printed table's rows: {name: value} (names are the first 18 characters)."""
    return {line[:18].strip(): line[18:].strip() for line in output.splitlines() if len(line) > 19}


def artifact_rows(run_id: str, name: str) -> list[dict]:
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/{name}")
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture(scope="module")
def trained(binary_root, tmp_path_factory):
    """One tiny run (4 epochs) on the binary synthetic data, its config file, and a .keras model
    of the same shape that predicts background everywhere (dice 0 on every scored image)."""
    tmp = tmp_path_factory.mktemp("compare")
    cfg = config.load(None, [f"data.root={binary_root}", f"train.output_dir={tmp / 'out'}", *TINY,
                             "experiment=cmp", "train.epochs=4", "train.patience=0", "gate.resamples=2000"])
    _, run_id = tracking.train(cfg)
    path = tmp / "cfg.yaml"
    path.write_text(config.to_yaml(cfg))
    inputs = keras.Input((32, 32, 3), name="image")
    nothing = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer="zeros",
                                                      bias_initializer=keras.initializers.Constant(-10.0))(inputs))
    nothing.save(tmp / "nothing.keras")
    return {"cfg": cfg, "yaml": path, "run_id": run_id, "nothing": tmp / "nothing.keras", "tmp": tmp}


def test_a_run_against_its_own_version_differs_by_exactly_zero(trained):
    run_id = trained["run_id"]
    registry.register_best(trained["cfg"], run_id=run_id)
    out = run("compare", "--config", trained["yaml"], run_id, "models:/seg-cmp/1").output
    rows = table(out)
    assert rows["A"] == run_id and rows["B"] == f"models:/seg-cmp/1 (run {run_id})"
    assert rows["images paired"] == "4 (0 skipped: no foreground in the truth)"
    assert rows["mean dice A"] == rows["mean dice B"]
    assert rows["difference B - A"] == "+0.0000"
    assert rows["95% interval"] == "[+0.0000, +0.0000] (paired bootstrap, 2000 resamples, seed 137)"
    assert rows["Wilcoxon p"] == "1" and rows["verdict"] == "no significant difference (the interval contains 0)"

    # The compare run: numbers as metrics, and per-image scores equal to the training run's own
    # per_image.csv (one definition of the per-image dice).
    compare_run = mlflow.search_runs(experiment_names=["cmp"], filter_string="attributes.run_name = 'compare'",
                                     output_format="list")[0]
    metrics = compare_run.data.metrics
    assert (metrics["paired_images"], metrics["difference"], metrics["ci_low"], metrics["ci_high"]) == (4, 0, 0, 0)
    assert compare_run.data.params["compare.b"] == "models:/seg-cmp/1"
    compared = artifact_rows(compare_run.info.run_id, "compare_per_image.csv")
    trained_rows = artifact_rows(run_id, "per_image.csv")
    assert [r["image"] for r in compared] == [r["image"] for r in trained_rows]
    for mine, theirs in zip(compared, trained_rows):
        assert float(mine["dice_a"]) == float(mine["dice_b"]) == pytest.approx(float(theirs["dice"]), abs=5e-5)
        assert float(mine["difference"]) == 0.0


def test_register_keeps_an_identical_copy_as_candidate(trained):
    # A second run holding the same network (identical weights) and the trained run's data tag:
    # registered, compared with the champion (the trained run), difference exactly 0.
    run_id = trained["run_id"]
    registry.register_best(trained["cfg"], run_id=run_id)  # version 1, champion (if not yet)
    source = mlflow.get_run(run_id)
    with mlflow.start_run(experiment_id=tracking.connect("cmp"), run_name="copy") as copy:
        mlflow.set_tags({k: v for k, v in tracking.run_values(source).items() if k.startswith(("model.", "data."))})
        mlflow.set_tag("seg_mlops.dataset_fingerprint", source.data.tags["seg_mlops.dataset_fingerprint"])
        mlflow.log_metric("best_val_dice_coef", source.data.metrics["best_val_dice_coef"])
        tracking.log_model(tracking.load_model(source.data.tags[tracking.MODEL_URI_TAG]))
    out = run("register", "--config", trained["yaml"], "--run-id", copy.info.run_id).output
    # ours, without data.prepare's note and MLflow's registration messages (stderr, in any order)
    lines = [line for line in out.splitlines()
             if not line.startswith(("masks: ", "Created version", "Registered model"))]
    assert lines[0].startswith(f"seg-cmp version 2: val_dice_coef=") and lines[0].endswith("is candidate")
    assert lines[1] == "paired test comparison, A = champion, B = version 2:"
    rows = table("\n".join(lines[2:]))
    assert (rows["difference B - A"], rows["95% interval"].split(" (")[0]) == ("+0.0000", "[+0.0000, +0.0000]")
    assert lines[-1].startswith("not promoted: stays candidate: not significantly better than champion version 1 "
                                "(the interval must lie above 0): mean per-image test dice")
    assert lines[-1].endswith("n=4 images (0 skipped), Wilcoxon p=1 (use --force to override)")
    client = mlflow.MlflowClient()
    assert int(client.get_model_version_by_alias("seg-cmp", "champion").version) == 1
    assert client.get_model_version("seg-cmp", "2").tags["gate_decision"] == "candidate"


def test_a_model_predicting_nothing_is_clearly_worse(trained):
    run_id = trained["run_id"]
    trained_dice = [float(r["dice"]) for r in artifact_rows(run_id, "per_image.csv")]
    assert min(trained_dice) > 0  # the premise: the trained run finds some foreground in every image
    out = run("compare", "--config", trained["yaml"], trained["nothing"], run_id, "--no-log").output
    rows = table(out)
    assert float(rows["mean dice A"]) == 0.0
    assert float(rows["mean dice B"]) == pytest.approx(np.mean(trained_dice), abs=1e-4)
    assert float(rows["difference B - A"]) == pytest.approx(np.mean(trained_dice), abs=1e-4)
    low, high = (float(x) for x in rows["95% interval"].split("]")[0].strip("[").split(","))
    # every difference is positive, so every resample mean is: the interval lies within them
    assert min(trained_dice) - 1e-4 <= low <= high <= max(trained_dice) + 1e-4 and low > 0
    assert rows["verdict"] == "B is better (the whole interval is above 0)"
    assert "note" in rows and "A's dataset fingerprint is unknown" in rows["note"]  # a .keras file


def test_other_data_is_refused_in_one_line_unless_forced(trained, tmp_path):
    other_root = synthetic.make_dataset(tmp_path / "other", classes=1, size=48, counts=(8, 4, 4), seed=5)
    other = config.override(trained["cfg"], {"data.root": str(other_root)})
    path = tmp_path / "other.yaml"
    path.write_text(config.to_yaml(other))
    refused = run("compare", "--config", path, trained["run_id"], "models:/seg-cmp/1", ok=False)
    assert refused.exit_code == 1
    fingerprint = mlflow.get_run(trained["run_id"]).data.tags["seg_mlops.dataset_fingerprint"]
    from seg_mlops import data

    assert refused.output == (f"Error: not compared: the config's data has fingerprint {data.fingerprint(other)} "
                              f"but the models were trained on {fingerprint}: its test split may not be held out "
                              "from their training (pass --force to compare anyway)\n")
    forced = table(run("compare", "--config", path, trained["run_id"], "models:/seg-cmp/1", "--force",
                       "--no-log").output)
    assert forced["difference B - A"] == "+0.0000" and forced["note"].startswith("forced: the config's data")


def test_usage_errors_are_one_line(trained):
    for args, message in ((["only-one"], "compare needs two models (A B) or --study"),
                          (["a", "b", "--study"], "compare needs two models (A B) or --study"),
                          (["nope", trained["run_id"]], "'nope' is no model: name a run id")):
        result = run("compare", "--config", trained["yaml"], *args, ok=False)
        assert result.exit_code == 1 and result.output.startswith(f"Error: {message}")
        assert result.output.count("\n") == 1


def test_study_seeded_trial_against_best_trial(tiny_cfg, tmp_path):
    # The hand-picked config learns nothing (lr 1e-9); the study's other trial learns (lr 0.02), so
    # it is the best trial on val_loss (as in test_tuning; the dice of 2 epochs is not reliable).
    cfg = tiny_cfg("experiment=cmp-study", f"tune.storage={tmp_path / 'study.journal'}", "tune.epochs=2",
                   "tune.n_trials=2", "train.learning_rate=1.0e-9", "train.patience=0", "gate.resamples=2000",
                   "train.monitor=val_loss",
                   "tune.space={train.learning_rate: [1.0e-9, 0.02]}", "tune.pruner=none")
    from seg_mlops import tuning

    tuning.load_study(cfg)  # made first so the config's trial is enqueued by run_study, then ours
    study = tuning.run_study(config.override(cfg, {"tune.n_trials": 1}))
    study.enqueue_trial({"train.learning_rate": 0.02})
    study = tuning.run_study(cfg)
    trials = study.get_trials()
    assert trials[0].user_attrs["seeded_from"] == "config" and study.best_trial.number == 1
    path = tmp_path / "cfg.yaml"
    path.write_text(config.to_yaml(cfg))

    out = run("compare", "--config", path, "--study").output
    rows = table(out)
    assert out.splitlines()[0] == ("study 'cmp-study': A = trial 0 (the config's own values), "
                                   "B = best trial 1")
    seed_run, best_run = (t.user_attrs[tuning.RUN_ID_ATTR] for t in trials)
    assert (rows["A"], rows["B"]) == (seed_run, best_run)
    a = [float(r["dice"]) for r in artifact_rows(seed_run, "per_image.csv")]
    b = [float(r["dice"]) for r in artifact_rows(best_run, "per_image.csv")]
    assert float(rows["difference B - A"]) == pytest.approx(np.mean(b) - np.mean(a), abs=2e-4)
    low = float(rows[f"95% interval"].split(",")[0].strip("["))
    assert rows["verdict"].startswith("B is better") == (low > 0)
