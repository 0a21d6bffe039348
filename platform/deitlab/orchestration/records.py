"""What MLflow says of a sweep's trials: the one reading of trial runs that the sweep driver, packs, `sweep status`
and `sweep resume` share. MLflow is the record of what finished."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from deitlab.tracking.names import DIVERGED_TAG, DRIVER_TAG, LAST_FAILURE_TAG, STOPPED_TAG
from deitlab.tracking.store import RunRecord, Tracking


@dataclass(frozen=True)
class TrialState:
    name: str
    state: str  # finished | stopped | failed | interrupted | running | pending
    run_id: str | None = None
    epoch: int | None = None
    value: float | None = None  # the sweep metric at the last epoch
    best: float | None = None  # the best value over epochs
    note: str = ""

    @property
    def done(self) -> bool:
        return self.state in ("finished", "stopped")


def is_done(run: RunRecord) -> bool:
    return run.status == "FINISHED" or STOPPED_TAG in run.tags


def runs_by_trial(tracking: Tracking, parent_id: str) -> dict[str, list[RunRecord]]:
    """Child runs by trial name, newest first."""
    by_name: dict[str, list] = {}
    for run in reversed(tracking.child_runs(parent_id)):
        by_name.setdefault(run.name, []).append(run)
    return by_name


def trial_states(tracking: Tracking, parent: RunRecord, names: list[str], metric: str = "acc", mode: str = "max",
                 history: bool = False) -> list[TrialState]:
    """What MLflow says of each planned trial (the newest finished run, else the newest run)."""
    by_name = runs_by_trial(tracking, parent.id)
    parent_alive = driver_state(parent) != "gone"
    states = []
    for name in names:
        runs = by_name.get(name, [])
        run = next((r for r in runs if is_done(r)), runs[0] if runs else None)
        if run is None:
            states.append(TrialState(name, "pending"))
            continue
        status, tags, metrics = run.status, run.tags, run.metrics
        if status == "FINISHED":
            state, note = "finished", ""
        elif STOPPED_TAG in tags:
            state, note = "stopped", tags[STOPPED_TAG]
        elif status == "FAILED":
            state, note = "failed", tags.get(DIVERGED_TAG) or tags.get(LAST_FAILURE_TAG, "")
        elif status == "RUNNING" and parent_alive:
            state, note = "running", ""
        else:
            state, note = "interrupted", ""
        best = None
        if history and metric in metrics:
            values = [m.value for m in tracking.metric_history(run.id, metric)]
            best = (max if mode == "max" else min)(values) if values else None
        epoch = metrics.get("epoch")
        states.append(TrialState(name, state, run.id, None if epoch is None else int(epoch),
                                 metrics.get(metric), best, note))
    return states


def driver_state(parent: RunRecord) -> str:
    """alive | gone | unknown: whether the sweep's driver process still runs (knowable only on its own host)."""
    if parent.status != "RUNNING":
        return "gone"
    host, _, pid = parent.tags.get(DRIVER_TAG, "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return "unknown"
    try:
        os.kill(int(pid), 0)
        return "alive"
    except OSError:
        return "gone"


def ray_run_name(run_name: str, run_id: str) -> str:
    """The storage directory of an MLflow run's Ray Train run: `--resume` finds it again from the run id."""
    return f"{run_name}-{run_id[:8]}"
