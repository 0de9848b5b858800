"""tracking/postgres.sh's server as Optuna's multi-worker storage: real PostgreSQL, real processes."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from urllib.parse import urlsplit

import optuna
import pytest
import sqlalchemy as sa

# One worker: load the study and run 5 trials, each a little slow so the two workers overlap.
WORKER = textwrap.dedent("""
    import os, sys, time
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        trial.set_user_attr("pid", os.getpid())
        time.sleep(0.1)
        return trial.suggest_float("x", -1.0, 1.0) ** 2

    study = optuna.load_study(study_name=sys.argv[2], storage=sys.argv[1])
    study.optimize(objective, n_trials=5)
""")


def test_two_processes_share_a_study(postgres_url):
    study = optuna.create_study(storage=postgres_url, study_name="pg-smoke")
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, postgres_url, "pg-smoke"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out

    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 10
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(10))
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers wrote to the one study


def _non_loopback_ip() -> str | None:
    """This machine's outgoing address (a UDP connect sends nothing), or None without a network."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def test_listens_on_loopback_only(postgres_url):
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SHOW listen_addresses")).scalar() == "127.0.0.1"
            assert str(conn.execute(sa.text("SELECT inet_server_addr()")).scalar()) == "127.0.0.1"
            # the URL's role is not a superuser (trust auth: keep it harmless)
            assert conn.execute(sa.text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                                ).scalar() is False
    finally:
        engine.dispose()

    ip = _non_loopback_ip()
    if ip is not None:
        port = urlsplit(postgres_url).port
        with pytest.raises(OSError):
            socket.create_connection((ip, port), timeout=3).close()
