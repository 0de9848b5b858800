"""Security basics: servers bind to 127.0.0.1 unless the user passes a host; a storage password
never reaches MLflow params, tags, run names, logged files or the terminal; training reads the
dataset folders and writes only to its output folder and the tracking store."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from seg_mlops import config
from seg_mlops.errors import SegMlopsError
from tests.conftest import TINY
from tests.test_concurrency import server
from tests.test_mlflow import free_port, venv_env
from tests.test_postgres import _non_loopback_ip as non_loopback_ip

SECRET = "s3cr3t-pw"


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets LISTENing on `port` (from /proc/net/tcp and tcp6: the
    kernel's own view, so a server cannot look loopback-only while listening elsewhere)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) != port or fields[3] != "0A":  # 0A = LISTEN
                continue
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, words))
    return found


def test_listening_addresses_reads_the_kernel_table():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert listening_addresses(port) == {"127.0.0.1"}
    assert listening_addresses(port) == set()


def assert_loopback_only(port: int) -> None:
    assert listening_addresses(port) == {"127.0.0.1"}
    ip = non_loopback_ip()
    if ip is not None:  # the machine's other address must refuse the connection
        with pytest.raises(OSError):
            socket.create_connection((ip, port), timeout=3).close()


def test_ui_binds_to_loopback_by_default(tmp_path):
    port = free_port()
    env = venv_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with server([sys.executable, "-m", "seg_mlops.cli", "ui", "--port", str(port)],
                f"http://127.0.0.1:{port}/health", env, tmp_path / "ui.log"):
        assert_loopback_only(port)


def test_ui_binds_where_the_user_asks(tmp_path):
    port = free_port()
    env = venv_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with server([sys.executable, "-m", "seg_mlops.cli", "ui", "--host", "0.0.0.0", "--port", str(port)],
                f"http://127.0.0.1:{port}/health", env, tmp_path / "ui.log"):
        assert listening_addresses(port) == {"0.0.0.0"}


def test_dashboard_binds_to_loopback_by_default(tmp_path):
    import optuna

    journal = tmp_path / "dash.journal"
    optuna.create_study(study_name="sec-dash", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    path = tmp_path / "dash.yaml"
    path.write_text(yaml.safe_dump({"experiment": "sec-dash", "tune": {"storage": str(journal)}}))
    port = free_port()
    with server([sys.executable, "-m", "seg_mlops.cli", "dashboard", "--config", str(path), "--port", str(port)],
                f"http://127.0.0.1:{port}/api/studies", venv_env(), tmp_path / "dashboard.log"):
        assert_loopback_only(port)


# ----------------------------------------------------------------------------- credentials

def test_public_config_hides_the_storage_password():
    cfg = config.load(None, [f"tune.storage=postgresql://optuna:{SECRET}@db:5432/optuna?sslmode=require"])
    shown = config.public(cfg)
    assert shown.tune.storage == "postgresql://optuna@db:5432/optuna?sslmode=require"
    assert SECRET not in config.to_yaml(shown) and SECRET not in str(config.flatten(shown))
    assert cfg.tune.storage.endswith("?sslmode=require") and SECRET in cfg.tune.storage  # the original is intact
    assert config.redact(f"postgresql://u@h/db?sslmode=x&password={SECRET}") == \
        "postgresql://u@h/db?sslmode=x&password=***"
    assert config.public(config.load(None)) == config.load(None)  # nothing to hide: the same config


def test_tune_never_shows_the_storage_password(postgres_url, binary_root, tmp_path, tracking_store):
    # tracking/postgres.sh's role uses trust auth, so any password is accepted: the URL carries one
    # the way a user's would, and it must not appear anywhere a user or a colleague can read.
    url = postgres_url.replace("postgresql://optuna@", f"postgresql://optuna:{SECRET}@")
    assert SECRET in url
    flat = config.parse_overrides(TINY + [f"data.root={binary_root}", f"train.output_dir={tmp_path / 'out'}",
                                          "train.epoch_infer_count=1", "train.patience=0"])
    nested: dict = {"experiment": "no-secrets",
                    "tune": {"epochs": 1, "n_trials": 1, "pruner": "none", "storage": url,
                             "space": {"train.learning_rate": [0.01, 0.02]}}}
    for key, value in flat.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    path = tmp_path / "no-secrets.yaml"
    path.write_text(yaml.safe_dump(nested))
    proc = subprocess.run([sys.executable, "-m", "seg_mlops.cli", "tune", "--config", str(path)],
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracking_store}, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 complete" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr

    mlflow.set_tracking_uri(tracking_store)
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["no-secrets"], output_format="list")
    assert len(runs) == 2  # the study's parent run and its one trial
    for run in runs:
        shown = [run.info.run_name, *run.data.params.values(), *run.data.tags.values()]
        assert not [s for s in shown if SECRET in s], run.info.run_name
        for artifact in client.list_artifacts(run.info.run_id):
            if artifact.path.endswith((".yaml", ".csv", ".txt", ".json")):
                text = Path(client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path))).read_text()
                assert SECRET not in text, artifact.path
    trial = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    logged = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{trial.info.run_id}/config.yaml"))
    assert logged["tune"]["storage"] == postgres_url  # still says where the study is
    for written in (tmp_path / "out").rglob("*.yaml"):
        assert SECRET not in written.read_text(), written


# ----------------------------------------------------------------------------- dataset folders

def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under root with its size and mtime (ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_training_never_writes_into_the_data_folders(binary_root, tmp_path, tracking_store):
    data = tmp_path / "data"
    shutil.copytree(binary_root, data)
    # Read-only as the dataset of a shared drive would be (root ignores the bits: the listing
    # comparison below is what proves nothing was written there).
    for path in [data, *data.rglob("*")]:
        path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH | (stat.S_IXUSR if path.is_dir() else 0))
    before = listing(data)
    work = tmp_path / "work"
    work.mkdir()
    cfg = {"experiment": "read-only-data", "data": {"root": "../data", "cache": "file"}}
    flat = config.parse_overrides(TINY + ["train.epochs=1"])
    for key, value in flat.items():
        section, name = key.split(".")
        cfg.setdefault(section, {})[name] = value
    (work / "ro.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_store}

    def cli(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "seg_mlops.cli", *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    cli("train", "--config", "ro.yaml")
    model = work / "outputs" / "read-only-data" / "best_model.keras"
    assert model.is_file()  # outputs/<experiment> under the working directory, not beside the data
    cli("evaluate", "--config", "ro.yaml", "--model", str(model))
    cli("infer", "--config", "ro.yaml", "--model", str(model), "--images", str(data / "test" / "images"),
        "--output", "masks", "--overlay", "--colorize")
    assert len(list((work / "masks").glob("*.png"))) == 4
    assert listing(data) == before
    assert sorted(p.name for p in work.iterdir()) == ["masks", "outputs", "ro.yaml"]
    for path in [data, *data.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # let pytest clean up


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", "", "C:\\x"])
def test_experiment_name_cannot_leave_the_output_folders(name):
    # experiment names folders (outputs/<experiment>, tracking/artifacts/<experiment>): a path in it
    # would write outside them.
    with pytest.raises(SegMlopsError, match=r"^experiment=.*: must be a plain name"):
        config.load(None, {"experiment": name})
    assert config.load(None, {"experiment": "Pap-Smear_v2.1"}).output_dir == Path("outputs/Pap-Smear_v2.1")
