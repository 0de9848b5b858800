"""Every MLproject entry point really runs: `mlflow run . -e <name> --env-manager local`, as the
README shows them. One tiny training (`-e train`), then `evaluate`, `infer`, `register` and `tune`
against it, and `seg-mlops register --from-study` from the command line on the study `tune` made.
The tests of this module share that one training and run in file order."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import keras
import mlflow
import numpy as np
import optuna
import pytest
import yaml
from PIL import Image

from seg_mlops import config, data, lifecycle, registry, tracking, tuning
from seg_mlops.infer import load_model
from tests.conftest import REPO, TINY, numpy_scores
from tests.test_mlflow import MLFLOW, venv_env

EXPERIMENT = "entry-points"
MODEL = registry.registered_name(EXPERIMENT)


def mlflow_run(entry: str, *params: str, store: str) -> str:
    """`mlflow run <repo> -e entry -P ...` in this venv; returns the id of the run MLflow made."""
    args = [MLFLOW, "run", str(REPO), "-e", entry, "--env-manager", "local", "--experiment-name", EXPERIMENT]
    for param in params:
        args += ["-P", param]
    proc = subprocess.run(args, env=venv_env(MLFLOW_TRACKING_URI=store), capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{entry}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    match = re.search(r"=== Run \(ID '(\w+)'\) succeeded ===", proc.stderr)
    assert match, proc.stderr[-2000:]
    mlflow.set_tracking_uri(store)
    return match.group(1)


@pytest.fixture(scope="module")
def trained(binary_root, tmp_path_factory, tracking_store):
    """The project config (a YAML file) and its one training through `mlflow run -e train`."""
    tmp = tmp_path_factory.mktemp("entry-points")
    flat = config.parse_overrides([*TINY, f"data.root={binary_root}", f"train.output_dir={tmp / 'out'}",
                                   f"tune.storage={tmp / 'study.journal'}", "tune.epochs=1", "tune.pruner=none"])
    nested: dict = {"experiment": EXPERIMENT, "tune": {"space": {"train.learning_rate": [0.01, 0.02]}}}
    for key, value in flat.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    path = tmp / "project.yaml"
    path.write_text(yaml.safe_dump(nested))
    tracking.connect(EXPERIMENT)  # artifacts beside the store, not in ./mlruns
    run_id = mlflow_run("train", f"config={path}", store=tracking_store)
    cfg = config.load(path, ["data.binary_mask=threshold"])  # synthetic masks are 0/255
    return SimpleNamespace(tmp=tmp, path=path, cfg=cfg, run_id=run_id, store=tracking_store,
                           model=load_model(tmp / "out" / "best_model.keras"))


def test_train_run_carries_the_commit_and_versions(trained):
    run = mlflow.MlflowClient().get_run(trained.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert tags["git_commit"] == head and len(head) == 40
    import seg_mlops
    import tensorflow as tf

    assert tags["version.keras"] == keras.__version__
    assert tags["version.mlflow"] == mlflow.__version__
    assert tags["version.seg-mlops"] == seg_mlops.__version__
    # tensorflow comes as tensorflow or tensorflow-cpu: one of the two tags names tf's version
    assert {tags["version.tensorflow"], tags["version.tensorflow-cpu"]} - {"none"} == {tf.__version__}
    assert tags["seg_mlops.seed"] == str(trained.cfg.seed)
    assert tags[lifecycle.OUTPUT_TAG] == str(trained.tmp / "out")
    history = mlflow.MlflowClient().get_metric_history(trained.run_id, "val_dice_coef")
    assert sorted(m.step for m in history) == [0, 1]
    assert run.data.metrics["best_val_dice_coef"] == pytest.approx(max(m.value for m in history))


def test_evaluate_entry_point(trained):
    uri = mlflow.MlflowClient().get_run(trained.run_id).data.tags[tracking.MODEL_URI_TAG]
    run_id = mlflow_run("evaluate", f"config={trained.path}", f"model_uri={uri}", store=trained.store)
    csv = trained.tmp / "out" / "evaluate" / "evaluation.csv"  # a models:/ URI: <output>/evaluate
    scores = {name: float(value) for name, value in (line.split(",") for line in csv.read_text().split()[1:])}
    expected = numpy_scores(trained.model, trained.cfg, "test")
    assert scores["dice_coef"] == pytest.approx(expected["dice_coef"], abs=6e-5)
    assert scores["dice_foreground"] == pytest.approx(expected["dice_foreground"], abs=6e-5)
    run = mlflow.MlflowClient().get_run(run_id)  # evaluate logged into the run MLflow made
    assert run.data.tags["seg_mlops.evaluated_model"] == uri
    assert run.data.metrics["test_dice_foreground"] == pytest.approx(expected["dice_foreground"], abs=1e-6)
    assert run.data.metrics["test_dice_coef"] == pytest.approx(scores["dice_coef"], abs=6e-5)


def test_infer_entry_point(trained):
    images = Path(trained.cfg.data.root) / "test" / "images"
    out = trained.tmp / "masks"
    mlflow_run("infer", f"config={trained.path}", f"model_uri=runs:/{trained.run_id}/model",
               f"images={images}", f"output={out}", store=trained.store)
    paths = sorted(images.iterdir())
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.stem + ".png" for p in paths)
    for path in paths:
        mask = np.asarray(Image.open(out / f"{path.stem}.png"))
        # the prediction at 32 px, probabilities resized (bilinear) to the original 48 px, then
        # thresholded: 0/255 at the image's own size
        image = data.read_rgb(path)
        small = data.resize_image(image, (32, 32), trained.cfg.data.image_interpolation)[None].astype(np.float32)
        prob = cv2.resize(trained.model.predict(small, verbose=0)[0, ..., 0], (48, 48), interpolation=cv2.INTER_LINEAR)
        assert mask.shape == image.shape[:2] == (48, 48)
        np.testing.assert_array_equal(mask, np.where(prob >= 0.5, 255, 0).astype(np.uint8))


def test_register_entry_point(trained):
    mlflow_run("register", f"config={trained.path}", store=trained.store)
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias(MODEL, "champion")
    best = client.get_run(trained.run_id).data.metrics["best_val_dice_coef"]
    assert (int(champion.version), champion.run_id) == (1, trained.run_id)  # the one run with a model
    assert champion.tags["metric"] == "val_dice_coef"
    assert float(champion.tags["metric_value"]) == pytest.approx(best)
    assert int(client.get_model_version_by_alias(MODEL, "candidate").version) == 1


def test_tune_entry_point_then_register_from_study(trained):
    mlflow_run("tune", f"config={trained.path}", "n_trials=2", store=trained.store)
    study = optuna.load_study(study_name=EXPERIMENT, storage=tuning.make_storage(trained.cfg))
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert trials[0].params == {"train.learning_rate": 0.01}  # the config's own values first
    client = mlflow.MlflowClient()
    for trial in trials:  # each trial: a child run trained tune.epochs=1 epoch, valued by it
        run = client.get_run(trial.user_attrs[tuning.RUN_ID_ATTR])
        assert run.info.status == "FINISHED" and run.data.tags["train.epochs"] == "1"
        assert run.data.tags["train.learning_rate"] == str(trial.params["train.learning_rate"])
        assert trial.value == pytest.approx(run.data.metrics["val_dice_coef"])

    # `seg-mlops register --from-study`: the best trial's run becomes version 2 and candidate;
    # champion only if it is significantly better than version 1 on the test images, paired.
    best = study.best_trial
    best_run = best.user_attrs[tuning.RUN_ID_ATTR]
    cli = Path(sys.executable).with_name("seg-mlops")
    proc = subprocess.run([str(cli), "register", "--config", str(trained.path), "--from-study"],
                          env=venv_env(MLFLOW_TRACKING_URI=trained.store), capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{MODEL} version 2: val_dice_coef={best.value:.4f} (run {best_run}) is candidate" in proc.stdout
    assert "paired test comparison, A = champion, B = version 2:" in proc.stdout
    version = client.get_model_version_by_alias(MODEL, "candidate")
    assert (int(version.version), version.run_id) == (2, best_run)
    assert version.tags["trial"] == str(best.number) and version.tags["study"] == EXPERIMENT
    assert (version.tags["compared_with"], version.tags["gate_n"]) == ("1", "4")  # the 4 synthetic test images
    promoted = version.tags["gate_decision"] == "promoted"
    assert promoted == (float(version.tags["gate_ci_low"]) > 0)  # the rule: the interval above 0
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == (2 if promoted else 1)
    assert ("promoted to champion" in proc.stdout) == promoted
