"""The `seg-mlops` commands as a user runs them: demo data -> train -> evaluate -> infer, and
bad input giving one `Error:` line with exit code 1 (no traceback)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from seg_mlops import config
from seg_mlops.cli import cli
from seg_mlops.infer import load_model
from tests.conftest import numpy_scores
from tests.test_mlflow import free_port, venv_env, wait_http


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(cli, list(args))
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def demo_config(tmp_path):
    run("make-demo-data", str(tmp_path / "data"), "--size", "48", "--counts", "8", "4", "4")
    cfg = {"experiment": "smoke", "data": {"root": "data"},
           "model": {"image_height": 32, "image_width": 32, "base_filters": 4, "num_layers": 3},
           "train": {"output_dir": "out", "epochs": 2, "batch_size": 4, "epoch_infer_count": 2}}
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_evaluate_infer(demo_config, tmp_path):
    out = tmp_path / "out"  # relative paths in the YAML resolve against its folder
    result = run("train", "--config", str(demo_config), "--set", "train.learning_rate=0.01")
    assert f"model: {out / 'best_model.keras'}" in result.output
    assert "after 2 epochs" in result.output

    result = run("evaluate", "--config", str(demo_config), "--model", str(out / "best_model.keras"))
    scores = dict(line.split(",") for line in (out / "evaluation.csv").read_text().splitlines()[1:])
    expected = numpy_scores(load_model(out / "best_model.keras"),
                            config.load(demo_config, ["data.binary_mask=threshold"]), "test")
    assert float(scores["dice_foreground"]) == pytest.approx(expected["dice_foreground"], abs=6e-5)
    assert float(scores["dice_coef"]) == pytest.approx(expected["dice_coef"], abs=6e-5)
    assert f"dice_foreground,{scores['dice_foreground']}" in result.output
    assert len((out / "per_image.csv").read_text().splitlines()) == 1 + 4

    result = run("infer", "--config", str(demo_config), "--model", str(out / "best_model.keras"),
                 "--images", str(tmp_path / "data" / "test" / "images"), "--output", str(tmp_path / "masks"),
                 "--overlay")
    assert "wrote 4 masks" in result.output
    mask = Image.open(tmp_path / "masks" / "cell_0000.png")
    assert mask.size == (48, 48)  # original size, not the model's 32 px
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert (tmp_path / "masks" / "overlay" / "cell_0000.png").exists()
    assert not (tmp_path / "masks" / "colorized").exists()


@pytest.mark.parametrize("args, message", [
    (["--set", "model.base_filter=8"], "Error: unknown config key 'model.base_filter'; did you mean 'model.base_filters'?"),
    (["--set", "train.epochs=-2"], "Error: train.epochs=-2: must be >= 1"),
    (["--set", "train.epochs=many"], "Error: train.epochs='many': expected an integer"),
    (["--set", "model.image_height=30"], "Error: model.image_height=30 is not divisible by 2**(num_layers-1)=4"),
])
def test_bad_input_is_one_line(demo_config, args, message):
    result = run("train", "--config", str(demo_config), *args, ok=False)
    assert result.exit_code == 1
    assert result.output.startswith(message)
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_missing_mask_names_the_file(demo_config, tmp_path):
    (tmp_path / "data" / "train" / "masks" / "cell_0003.png").unlink()
    result = run("train", "--config", str(demo_config), ok=False)
    assert result.exit_code == 1
    assert "1 image(s) without a mask" in result.output and "cell_0003" in result.output
    assert not (tmp_path / "out").exists()  # failed before anything was written


def test_console_script_exit_code_and_no_traceback(tmp_path):
    # The installed entry point, in a real process: what a shell user sees.
    proc = subprocess.run([sys.executable, "-m", "seg_mlops.cli", "evaluate", "--config",
                           str(tmp_path / "missing.yaml"), "--model", "x.keras"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"Error: config file not found: {tmp_path / 'missing.yaml'}"


def descendants(pid: int) -> set[int]:
    """The processes below `pid` now (Linux /proc: field 4 of /proc/<pid>/stat is the parent)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie holds no port and waits only for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "(gone)"


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("command, signum", [("ui", signal.SIGTERM), ("dashboard", signal.SIGTERM),
                                             ("ui", signal.SIGINT)])  # SIGINT: Ctrl-C
def test_stopping_the_command_stops_the_server_and_its_workers(command, signum, tmp_path):
    import optuna

    port = free_port()
    env = venv_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    if command == "ui":
        args, url = ["ui", "--port", str(port)], f"http://127.0.0.1:{port}/health"
    else:
        journal = tmp_path / "stop.journal"
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        optuna.create_study(study_name="stop", storage=storage)
        path = tmp_path / "dash.yaml"
        path.write_text(yaml.safe_dump({"experiment": "stop", "tune": {"storage": str(journal)}}))
        args, url = ["dashboard", "--config", str(path), "--port", str(port)], f"http://127.0.0.1:{port}/api/studies"
    # Its own session, as a shell job is; the signal goes to seg-mlops alone, not to what it started
    # (as `kill <pid>` or a process manager sends it).
    proc = subprocess.Popen([sys.executable, "-m", "seg_mlops.cli", *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    started: set[int] = set()
    try:
        wait_http(url, proc, seconds=300)  # an mlflow server start on a loaded 2-core machine is slow
        started = descendants(proc.pid)
        assert started  # the server (and, for ui, uvicorn and its workers)
        proc.send_signal(signum)
        code = proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while ({p for p in started if running(p)} or port_open(port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {p: cmdline(p) for p in started if running(p)}
        assert not left, left
        assert not port_open(port)
        assert code == 128 + signum  # as a shell reports a command stopped by that signal
    finally:  # whatever happened, leave nothing behind
        for pid in {proc.pid, *started, *descendants(proc.pid)}:
            if running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
