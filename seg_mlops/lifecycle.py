"""Honest run statuses: which process owns a RUNNING run, and what happens when it is gone.

A run killed with SIGKILL (or by a power cut) cannot end itself and would stay RUNNING forever.
Every run we start records its process (host, pid, process start time) in tags; every command
that opens the tracking store first marks the RUNNING runs of dead processes of this host FAILED,
with a tag saying why. Runs of other hosts are left alone (their processes cannot be checked).
This module also decides whether a run may be resumed.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from seg_mlops.errors import SegMlopsError

HOST_TAG = "seg_mlops.host"
PID_TAG = "seg_mlops.pid"
PID_START_TAG = "seg_mlops.pid_start"  # tells a live pid from a reused one
OUTPUT_TAG = "seg_mlops.output_dir"
ENDED_TAG = "seg_mlops.ended_by"  # why a run was ended by someone else than its process
RESUMES_TAG = "seg_mlops.resumes"  # how many times the run was resumed
RESUMED_RUN_TAG = "seg_mlops.resumed_run_id"  # on a `mlflow run` wrapper: the run it resumed


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux /proc), "" where unknown."""
    try:
        # Field 22 of /proc/<pid>/stat; the command name (field 2) may hold spaces, so split after ")".
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    """Tags naming this process as the owner of a run (and the command it runs)."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: _start_time(os.getpid()),
            "seg_mlops.command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:500]}


def process_alive(tags: dict[str, str]) -> bool:
    """Whether the process that the tags name still runs (on this host)."""
    try:
        pid = int(tags[PID_TAG])
        os.kill(pid, 0)
    except (KeyError, ValueError):
        return False
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    started = tags.get(PID_START_TAG, "")
    return not started or _start_time(pid) in ("", started)


def mark_dead_runs(client: MlflowClient) -> list[str]:
    """Mark FAILED every RUNNING run whose process (on this host) is gone; returns their ids."""
    host = socket.gethostname()
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiments:
        return []
    runs = client.search_runs(experiments, f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
                              max_results=1000)
    ended = []
    for run in runs:
        if process_alive(run.data.tags):
            continue
        pid = run.data.tags.get(PID_TAG, "?")
        client.set_tag(run.info.run_id, ENDED_TAG,
                       f"process {pid} on {host} died while the run was RUNNING; marked FAILED by pid "
                       f"{os.getpid()}. Continue it: seg-mlops train --resume {run.info.run_id}")
        client.set_terminated(run.info.run_id, "FAILED")
        print(f"note: run {run.info.run_id} was left RUNNING by dead process {pid}: marked FAILED "
              f"(resume it with seg-mlops train --resume {run.info.run_id})", file=sys.stderr)
        ended.append(run.info.run_id)
    return ended


def check_resumable(run: Run, experiment_id: str, flat_config: dict[str, str],
                    recorded: dict[str, str] | None = None) -> Path:
    """The output folder of `run` if it may be resumed with this config, else a one-line error.

    Args:
        run: the run to resume.
        experiment_id: the experiment the config's `experiment` names.
        flat_config: the config to resume with, flattened and stringified (tracking.flat_config).
        recorded: the run's whole config the same way (default: its params); every key is compared.
    """
    run_id, status, tags = run.info.run_id, run.info.status, run.data.tags
    if run.info.lifecycle_stage == "deleted":
        raise SegMlopsError(f"run {run_id} is deleted: restore it first (mlflow runs restore)")
    if status == "FINISHED":
        raise SegMlopsError(f"run {run_id} is FINISHED: nothing to resume")
    if OUTPUT_TAG not in tags:
        raise SegMlopsError(f"run {run_id} has no {OUTPUT_TAG} tag: it was not started by seg-mlops train")
    host = socket.gethostname()
    if tags.get(HOST_TAG, host) != host:
        raise SegMlopsError(f"run {run_id} trained on host {tags[HOST_TAG]} (its state is in "
                            f"{tags[OUTPUT_TAG]} there): resume it on that host")
    if status == "RUNNING" and process_alive(tags):
        raise SegMlopsError(f"run {run_id} is still RUNNING in process {tags.get(PID_TAG)} on {host}: "
                            "stop it before resuming")
    if run.info.experiment_id != experiment_id:
        raise SegMlopsError(f"run {run_id} belongs to experiment id {run.info.experiment_id}, but the config's "
                            f"experiment '{flat_config.get('experiment')}' is id {experiment_id}: "
                            "resume with the run's own config")
    recorded = run.data.params if recorded is None else recorded
    differ = [k for k, v in flat_config.items() if k in recorded and recorded[k] != v]
    if differ:
        listed = ", ".join(f"{k}: run {recorded[k]!r}, config {flat_config[k]!r}" for k in differ[:5])
        raise SegMlopsError(f"run {run_id} was trained with another config ({listed}"
                            f"{', ...' if len(differ) > 5 else ''}): resume without --config to use its own")
    return Path(tags[OUTPUT_TAG])
