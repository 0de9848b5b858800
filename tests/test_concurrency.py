"""Concurrency: four `seg-mlops tune` workers on one PostgreSQL study, logging through one
`mlflow server` (PostgreSQL-backed, its own schema of the same cluster), while pollers read the
MLflow REST API and optuna-dashboard's API the whole time. No trial may be lost or trained twice,
no run duplicated, no "database is locked", no traceback, and every poll answered 200.

Why PostgreSQL for MLflow too: with sqlite, four processes writing metrics and images at once
(plus the UI reading) contend for one file lock; a server over PostgreSQL is the team setup the
README describes, and the workers only talk HTTP to it (`seg-mlops ui` over the PostgreSQL store).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import mlflow
import optuna
import sqlalchemy as sa

from seg_mlops import tuning
from tests.test_mlflow import free_port, venv_env, wait_http
from tests.test_tuning import _worker_yaml

WORKERS = 4
N_TRIALS = 8


@contextmanager
def server(args: list[str], url: str, env: dict[str, str], log: Path, seconds: float = 300,
           cwd: Path | None = None):
    """A server process with its output kept in `log` (to search it for errors afterwards); it
    may take `seconds` to answer (an `mlflow server` start on a loaded 2-core CI box is slow)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                stdin=subprocess.DEVNULL, cwd=cwd)
    try:
        wait_http(url, proc, seconds=seconds)
        yield proc
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


class Poller(threading.Thread):
    """Reads an API in a loop until stopped, recording every HTTP status (or error)."""

    def __init__(self, name: str, request):
        super().__init__(name=name, daemon=True)
        self.request, self.statuses, self.stop = request, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(self.request(), timeout=60) as response:
                    json.loads(response.read())
                    self.statuses.append(response.status)
            except urllib.error.HTTPError as exc:
                self.statuses.append(exc.code)
            except (OSError, ValueError) as exc:
                self.statuses.append(repr(exc))
            self.stop.wait(0.5)


def test_four_workers_with_both_uis_reading(postgres_url, binary_root, tmp_path):
    # MLflow's tables in their own schema of the cluster's database: Optuna and MLflow both keep
    # an alembic_version table, so they must not share one schema.
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS mlflow"))
    engine.dispose()
    mlflow_store = f"{postgres_url}?options=-csearch_path%3Dmlflow"

    name = "four-workers"
    path = _worker_yaml(tmp_path, binary_root, name, epochs=1, n_trials=N_TRIALS, storage=postgres_url)
    mlflow_port, dash_port = free_port(), free_port()
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    env = venv_env(MLFLOW_TRACKING_URI=mlflow_url, TF_CPP_MIN_LOG_LEVEL="2")
    # `seg-mlops ui` over the PostgreSQL store (artifacts under its working folder's tracking/).
    mlflow_args = [sys.executable, "-m", "seg_mlops.cli", "ui", "--port", str(mlflow_port)]
    ui_env = venv_env(MLFLOW_TRACKING_URI=mlflow_store)
    dash_args = [sys.executable, "-m", "seg_mlops.cli", "dashboard", "--config", str(path), "--port", str(dash_port)]
    # The study exists before the dashboard starts, so its poller has a study to read.
    optuna.create_study(study_name=name, storage=postgres_url, direction="maximize", load_if_exists=True)

    with server(mlflow_args, f"{mlflow_url}/health", ui_env, tmp_path / "mlflow-server.log", cwd=tmp_path), \
            server(dash_args, f"http://127.0.0.1:{dash_port}/api/studies", env, tmp_path / "dashboard.log"):
        mlflow.set_tracking_uri(mlflow_url)
        experiment_id = mlflow.create_experiment(name)  # once, not by four racing workers
        study_id = optuna.load_study(study_name=name, storage=postgres_url)._study_id
        search = json.dumps({"experiment_ids": [experiment_id], "max_results": 1000}).encode()
        pollers = [
            Poller("mlflow-runs", lambda: urllib.request.Request(
                f"{mlflow_url}/api/2.0/mlflow/runs/search", data=search,
                headers={"Content-Type": "application/json"})),
            Poller("dashboard-studies", lambda: f"http://127.0.0.1:{dash_port}/api/studies"),
            Poller("dashboard-study", lambda: f"http://127.0.0.1:{dash_port}/api/studies/{study_id}?after=0"),
        ]
        for poller in pollers:
            poller.start()
        workers = [subprocess.Popen([sys.executable, "-m", "seg_mlops.cli", "tune", "--config", str(path)],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    stdin=subprocess.DEVNULL) for _ in range(WORKERS)]
        outputs = [w.communicate(timeout=900)[0] for w in workers]
        # A last round of polls over the finished study: two more answers from every poller, so at
        # least one of them was asked after the workers ended (the first may have been in flight).
        answered = [len(poller.statuses) for poller in pollers]
        deadline = time.time() + 180
        while any(len(p.statuses) < n + 2 for p, n in zip(pollers, answered)):
            assert time.time() < deadline, [(p.name, p.statuses[-3:]) for p in pollers]
            time.sleep(0.1)
        for poller in pollers:
            poller.stop.set()
            poller.join(timeout=90)
        runs = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list")

    logs = outputs + [(tmp_path / "mlflow-server.log").read_text(), (tmp_path / "dashboard.log").read_text()]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    for text in logs:
        assert "database is locked" not in text
        assert "Traceback" not in text, text[-3000:]

    trials = optuna.load_study(study_name=name, storage=postgres_url).get_trials()
    # Each worker stops once the study holds N_TRIALS finished trials; trials already running then
    # finish too (Optuna's MaxTrialsCallback), so up to WORKERS-1 more. None may be lost.
    assert N_TRIALS <= len(trials) <= N_TRIALS + WORKERS - 1
    assert [t.number for t in trials] == list(range(len(trials)))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.state for t in trials]
    run_ids = [t.user_attrs[tuning.RUN_ID_ATTR] for t in trials]
    assert len(set(run_ids)) == len(trials)  # no trial trained twice

    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.info.run_id for r in children) == sorted(run_ids)  # one run per trial, none duplicated
    assert len(parents) == WORKERS and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} <= {r.info.run_id for r in parents}

    for poller in pollers:
        assert len(poller.statuses) >= 3, poller.name  # it really read during the run
        assert set(poller.statuses) == {200}, (poller.name, [s for s in poller.statuses if s != 200][:5])
