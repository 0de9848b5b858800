"""The UIs as a user sees them: `seg-mlops ui` (MLflow) and `seg-mlops dashboard` (optuna-dashboard)
opened in headless Chromium, asserting on the rendered pages (not on the JSON behind them).

Chromium and chromedriver come from Debian (tests/browser.sh installs them when missing, as
tracking/postgres.sh does for PostgreSQL); Selenium from the package's `test` extra. Screenshots
are kept under outputs/test-artifacts/ (gitignored) for a person to look at.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import mlflow
import numpy as np
import optuna
import pytest
import yaml

from seg_mlops import registry, tracking
from tests.conftest import REPO
from tests.test_concurrency import server
from tests.test_mlflow import free_port, venv_env

ARTIFACTS = REPO / "outputs" / "test-artifacts"
WAIT = 90  # seconds a page may take to render on a loaded CI machine


def _must_run() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("SEG_MLOPS_REAL_DATA"))


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Selenium, installed by tests/browser.sh when missing. Where it
    cannot be had, CI (CI or SEG_MLOPS_REAL_DATA set) fails; a developer's run skips."""
    def unavailable(why: str):
        (pytest.fail if _must_run() else pytest.skip)(f"browser tests: {why}")

    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (pip install -e '.[test]')")
    proc = subprocess.run(["bash", str(REPO / "tests" / "browser.sh")], capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not proc.stdout.strip():
        unavailable(f"tests/browser.sh failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    chromium, chromedriver = proc.stdout.strip().splitlines()[-1].split()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="seg-mlops-chromium-")
    # The background-networking flags matter on machines without internet: without them Chromium
    # keeps retrying refused connections and pages stall.
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1600,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(WAIT)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def page_text(driver, url: str | None, *expected: str) -> str:
    """Open url (None: stay) and wait until the rendered page shows every expected string; returns its text."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    if url is not None:  # None: the page as it is now
        driver.get(url)

    def body(d) -> str:  # whitespace collapsed: innerText puts a heading and its count on two lines
        return " ".join(d.execute_script("return document.body ? document.body.innerText : ''").split())

    try:
        WebDriverWait(driver, WAIT, poll_frequency=0.5).until(lambda d: all(s in body(d) for s in expected))
    except TimeoutException:
        text = body(driver)
        missing = [s for s in expected if s not in text]
        shot = ARTIFACTS / "failed-page.png"
        driver.save_screenshot(str(shot))
        raise AssertionError(f"{url} never showed {missing} (screenshot {shot}); it shows:\n{text[:2000]}") from None
    return body(driver)


def loaded_images(driver, fragment: str) -> list[dict]:
    """<img> elements whose src contains fragment, with their natural size (0 = not loaded)."""
    return driver.execute_script(
        "return Array.from(document.images).filter(i => i.src.includes(arguments[0]))"
        ".map(i => ({src: i.src, width: i.naturalWidth, height: i.naturalHeight, complete: i.complete}))",
        fragment)


def in_view(driver, fragment: str) -> dict:
    """Where the first <img> whose src contains fragment lies: its box, the box of the nearest
    scrolling ancestor (the card's content area) and that ancestor's scroll offset."""
    return driver.execute_script("""
        const img = Array.from(document.images).find(i => i.src.includes(arguments[0]));
        if (!img) return null;
        let box = img.parentElement;
        while (box && box !== document.body && !/(auto|scroll)/.test(getComputedStyle(box).overflowY)) {
            box = box.parentElement;
        }
        const r = img.getBoundingClientRect(), b = box.getBoundingClientRect();
        return {img: [r.top, r.bottom, r.left, r.right], box: [b.top, b.bottom, b.left, b.right],
                scrolled: box.scrollTop, src: img.src, width: img.naturalWidth,
                viewport: [window.innerHeight, window.innerWidth]};""", fragment)


def inside(where: dict) -> bool:
    (top, bottom, left, right), (btop, bbottom, bleft, bright) = where["img"], where["box"]
    return (where["scrolled"] == 0 and btop <= top < bottom <= bbottom and bleft <= left < right <= bright
            and bottom <= where["viewport"][0])


def wait_for(driver, condition, what: str, shot: str = "failed-page.png"):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.5).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(ARTIFACTS / shot))
        raise AssertionError(f"never: {what} (screenshot {ARTIFACTS / shot})") from None


def test_mlflow_ui_shows_the_run_its_curves_and_epoch_images(browser, tiny_cfg, tracking_store, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # a tiny run lasts seconds
    cfg = tiny_cfg("experiment=in-the-browser", "train.epochs=2", "train.epoch_infer_count=4",
                   "train.patience=0")
    result, run_id = tracking.train(cfg, run_name="browser-run")
    # what `mlflow run` (make demo) adds to the run: its entry point's parameters
    mlflow.MlflowClient().log_batch(run_id, params=[mlflow.entities.Param("config", "configs/demo.yaml"),
                                                    mlflow.entities.Param("set", "")])
    version = registry.register_best(cfg, run_id=run_id).version
    experiment_id = mlflow.get_experiment_by_name("in-the-browser").experiment_id
    logged = mlflow.get_run(run_id).data.metrics
    system = sorted(k for k in logged if k.startswith("system/"))  # MLflow's monitor, on by default
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(system)
    metrics = len(logged) - len(system)  # one chart each, in the "Model metrics" section
    port = free_port()
    args = [sys.executable, "-m", "seg_mlops.cli", "ui", "--port", str(port)]
    with server(args, f"http://127.0.0.1:{port}/health", venv_env(MLFLOW_TRACKING_URI=tracking_store),
                ARTIFACTS / "mlflow-ui.log"):
        # The link `seg-mlops ui` prints opens the experiment in MLflow's model-training layout:
        # its runs table (with each run's three datasets) and Models, not GenAI's traces and judges.
        printed = (ARTIFACTS / "mlflow-ui.log").read_text()
        link = re.search(r"^  in-the-browser: (http\S+)$", printed, re.M).group(1)
        assert link == f"http://127.0.0.1:{port}/#/experiments/{experiment_id}?workflowType=machine_learning"
        text = page_text(browser, link, "browser-run", "Runs", "Models", "Model registry",
                         *(f"in-the-browser-{s}" for s in ("train", "valid", "test")))
        assert "Judges" not in text and "Sessions" not in text
        browser.save_screenshot(str(ARTIFACTS / "mlflow-experiment.png"))
        ml = "?workflowType=machine_learning"  # the layout for the pages opened below too
        base_url = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}"

        # The run page: its name, config tags, metrics, its one-line description, and the three splits
        # it was trained and tested on (the first shown, the others one click away).
        text = page_text(browser, f"{base_url}/runs/{run_id}{ml}", "browser-run", "val_dice_coef",
                         "model.base_filters", "in-the-browser-train (", "Training",
                         "UNet (binary, 4 base filters) trained on 'in-the-browser'")
        assert "8 train / 4 valid / 4 test images, 32x32 px" in text
        browser.find_element(By.XPATH, "//*[text()='+2']").click()
        page_text(browser, None, "in-the-browser-valid (", "Validation", "in-the-browser-test (", "Testing")
        browser.save_screenshot(str(ARTIFACTS / "mlflow-run.png"))

        # Model metrics: one image card of the epoch panels (with the step slider) and a chart per
        # curve. The panel image must really load (naturalWidth > 0).
        key = f"epoch_infer~{tracking.PANELS_KEY}"
        page_text(browser, f"{base_url}/runs/{run_id}/model-metrics{ml}", "epoch_infer (1)",
                  f"Model metrics ({metrics})", f"epoch_infer/{tracking.PANELS_KEY}")
        wait_for(browser, lambda d: any(i["width"] > 0 and i["complete"] for i in loaded_images(d, key)),
                 "the epoch panel image loads")
        assert "get-artifact" in in_view(browser, key)["src"]
        # MLflow 3.17 tops every image card with all the run's params (mlflow#23512) and its "Show
        # run parameters" switch (mlflow#23705) defaults to on: a run logs no config params
        # (tracking.COMPARED_KEYS says why), so in the default view the picture, sized for the
        # card (callbacks.composite), is seen whole without scrolling, even under the two
        # parameters `mlflow run` logs.
        assert set(mlflow.get_run(run_id).data.params) == {"config", "set"}
        where = wait_for(browser, lambda d: (w := in_view(d, key)) and w["width"] > 0 and inside(w) and w,
                         "the epoch panel lies inside its card's visible area", "mlflow-model-metrics-default.png")
        first = where["src"]
        browser.save_screenshot(str(ARTIFACTS / "mlflow-model-metrics.png"))
        # The step slider's box: step 0 -> step 1 shows the next epoch's picture, in place.
        box = browser.find_element(By.CSS_SELECTOR, "input[type=number]")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("1")
        box.send_keys(Keys.TAB)
        where = wait_for(browser, lambda d: (w := in_view(d, key)) and w["src"] != first and w["width"] > 0
                         and inside(w) and w, "the step slider changes the image")
        assert re.search(r"step(%2B|\+)1(%2B|\+)", where["src"]) and re.search(r"step(%2B|\+)0(%2B|\+)", first), \
            (first, where["src"])
        browser.save_screenshot(str(ARTIFACTS / "mlflow-model-metrics-step1.png"))

        # Charts render only when scrolled into view: the page's own search box brings each
        # validation curve up, as a user would find it; a rendered chart's legend is "run (metric)".
        search = browser.find_element(By.CSS_SELECTOR, "input[placeholder*='Search metric charts']")
        for name in ("val_loss", "val_dice_coef"):
            search.send_keys(Keys.CONTROL, "a")
            search.send_keys(Keys.DELETE)
            search.send_keys(name)
            wait_for(browser, lambda d, name=name: f"browser-run ({name})" in " ".join(
                d.execute_script("return document.body.innerText").split()), f"the {name} chart")
        browser.save_screenshot(str(ARTIFACTS / "mlflow-val-curves.png"))

        # System metrics: MLflow's CPU and memory charts of the run.
        browser.find_element(By.XPATH, "//*[normalize-space(text())='System metrics']").click()
        page_text(browser, None, f"System metrics ({len(system)})", "cpu_utilization_percentage")
        wait_for(browser, lambda d: re.search(r"browser-run \((system/)?cpu_utilization_percentage\)", " ".join(
            d.execute_script("return document.body.innerText").split())), "the CPU chart is drawn")
        browser.save_screenshot(str(ARTIFACTS / "mlflow-system-metrics.png"))

        # The per-image review: the test images worst first, each row with its thumbnail.
        review = mlflow.MlflowClient().load_table(experiment_id, "per_image_review.json", run_ids=[run_id])
        text = page_text(browser, f"{base_url}/runs/{run_id}/artifacts/per_image_review.json{ml}",
                         "View as table", "input | truth | prediction", review["image"][0], f"{review['dice'][0]:.4f}")
        shown = [name for name in review["image"] if name in text]  # the rows of the table's first page
        assert len(shown) >= 3 and shown == list(review["image"][:len(shown)])
        thumbs = wait_for(browser, lambda d: len(t := [i for i in loaded_images(d, "table_images") if i["width"] > 0])
                          == len(shown) and t, "a thumbnail per row")
        assert all(abs(i["width"] / i["height"] - (3 * 32 + 4) / 32) < 0.05 for i in thumbs)
        browser.save_screenshot(str(ARTIFACTS / "mlflow-per-image-review.png"))

        # The registered version: its description is the model card.
        fingerprint = mlflow.get_run(run_id).data.tags["seg_mlops.dataset_fingerprint"]
        page_text(browser, f"http://127.0.0.1:{port}/#/models/seg-in-the-browser/versions/{version}{ml}",
                  f"Version {version}", "Description", fingerprint, "test_dice_coef",
                  f"models:/seg-in-the-browser/{version}")
        browser.save_screenshot(str(ARTIFACTS / "mlflow-model-version.png"))
    assert (ARTIFACTS / "mlflow-model-metrics.png").stat().st_size > 10_000  # a real rendering, not blank


def test_dashboard_shows_the_study_trials(browser, tmp_path):
    # A study in the journal storage the `tune` command uses, with values we know, so the
    # rendered numbers can be checked exactly.
    journal = tmp_path / "browser.journal"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.create_study(study_name="browser-study", storage=storage, direction="maximize")
    space = {"train.learning_rate": optuna.distributions.FloatDistribution(0.001, 0.1, log=True)}
    # Trial 1 runs as tuning's objective does: it uploads its picture (tuning.upload_pictures) to
    # the artifact store the dashboard reads, while running.
    from PIL import Image

    from seg_mlops.callbacks import composite

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    panels = [np.concatenate([np.full((40, 40, 3), c, np.uint8) for c in (60, 120, 200)], axis=1)] * 2
    Image.fromarray(composite(panels)).save(tmp_path / "best_epoch_panels.png")
    for lr, value in ((0.01, 0.625), (0.02, 0.8125), (0.005, 0.4375)):
        if lr != 0.02:
            study.add_trial(optuna.trial.create_trial(params={"train.learning_rate": lr}, distributions=space,
                                                      value=value, intermediate_values={0: value / 2, 1: value}))
            continue
        study.enqueue_trial({"train.learning_rate": lr})
        trial = study.ask(space)
        assert trial.number == 1
        for step, reported in ((0, value / 2), (1, value)):
            trial.report(reported, step)
        optuna.artifacts.upload_artifact(artifact_store=optuna.artifacts.FileSystemArtifactStore(str(pictures)),
                                         file_path=str(tmp_path / "best_epoch_panels.png"), study_or_trial=trial,
                                         mimetype="image/png")
        study.tell(trial, value)
    path = tmp_path / "dash.yaml"
    path.write_text(yaml.safe_dump({"experiment": "browser-study",
                                    "tune": {"storage": str(journal), "artifact_dir": str(pictures)}}))
    port = free_port()
    args = [sys.executable, "-m", "seg_mlops.cli", "dashboard", "--config", str(path), "--port", str(port)]
    with server(args, f"http://127.0.0.1:{port}/api/studies", venv_env(), ARTIFACTS / "dashboard.log"):
        url = f"http://127.0.0.1:{port}/dashboard/studies/{study._study_id}"
        text = page_text(browser, url, "browser-study", "Best Trial (number=1)", "0.8125",
                         "train.learning_rate: 0.02", "Hyperparameter Importance")
        assert "Intermediate values" in text
        browser.save_screenshot(str(ARTIFACTS / "dashboard-study.png"))
        text = page_text(browser, f"{url}/trials", "3 Trials", "Trial 0", "Trial 1", "Trial 2", "0.625")
        assert text.count("Complete") >= 3
        browser.save_screenshot(str(ARTIFACTS / "dashboard-trials.png"))
        # Trial 1's page shows its picture, served from the artifact store.
        page_text(browser, f"{url}/trials?numbers=1", "Trial 1", "best_epoch_panels.png")
        wait_for(browser, lambda d: [i for i in loaded_images(d, f"/artifacts/{study._study_id}/{trial._trial_id}/")
                                     if (i["width"], i["height"]) == (2 * 3 * 40 + 4, 40)], "trial 1's panel image loads")
        browser.save_screenshot(str(ARTIFACTS / "dashboard-trial-picture.png"))
    assert (ARTIFACTS / "dashboard-study.png").stat().st_size > 10_000
