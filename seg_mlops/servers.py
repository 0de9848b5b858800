"""The servers `seg-mlops ui` and `seg-mlops dashboard` start: stopping the command stops them all.

`mlflow server` runs uvicorn, whose parent starts worker processes; killing only the process we
started (or only seg-mlops) leaves the workers holding the port. So the server gets its own
process group, and Ctrl-C, SIGTERM or SIGHUP (the terminal closed) stop that whole group: SIGTERM
first, SIGKILL for what is left after STOP_WAIT_S or at a second signal. Its own session also
keeps the terminal's Ctrl-C from reaching the server twice, racing our orderly stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Mapping, Sequence

STOP_WAIT_S = 10.0  # how long the server may take to shut down cleanly before SIGKILL
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Stopped(Exception):
    """A stop signal arrived (raised by the handler in the main thread, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame) -> None:
    raise _Stopped(signum)


def serve(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run a server until it exits (its exit code) or this process is stopped (128 + the signal,
    as a shell reports it); either way no process of the server's group is left running."""
    proc = subprocess.Popen(list(cmd), env=None if env is None else dict(env), start_new_session=True)
    previous = {s: signal.signal(s, _raise_stopped) for s in STOP_SIGNALS}
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except _Stopped as stop:
        return 128 + stop.signum
    finally:
        stop_group(proc)
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of `proc`, wait up to STOP_WAIT_S for all of it (workers can
    outlive their parent), then SIGKILL what is left; a second signal skips the wait."""
    if not _signal_group(proc.pid, signal.SIGTERM):
        return
    try:
        deadline = time.monotonic() + STOP_WAIT_S
        proc.wait(timeout=STOP_WAIT_S)
        while time.monotonic() < deadline and _signal_group(proc.pid, 0):
            time.sleep(0.1)
    except (subprocess.TimeoutExpired, KeyboardInterrupt, _Stopped):
        pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, signum: int) -> bool:
    """Send `signum` to the group (0: only check it); False when no process of it is left."""
    try:
        os.killpg(pgid, signum)
        return True
    except ProcessLookupError:
        return False
