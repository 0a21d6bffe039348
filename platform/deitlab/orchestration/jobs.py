"""Ray Jobs adapter: a sweep submitted to a cluster is a Ray Job whose entrypoint is the same `deitlab sweep run`.

The client resolves and validates the sweep (every trial) before anything is sent, then ships the platform's own
code (`py_modules`) and the resolved spec (`working_dir`, a single JSON file): the cluster needs deitlab's
dependencies installed, not deitlab. Credentials are never put in the job's environment: the cluster's nodes have
their own (AWS_* variables, instance profiles).
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

from deitlab.errors import SpecError, one_line
from deitlab.spec.sweep import SweepSpec
from deitlab.tracking.names import GIT_ENV
from deitlab.tracking.store import git_commit

SWEEP_METADATA = "deitlab.sweep"
SPEC_FILE = "sweep.json"
AGENT_WAIT_S = 180  # a head node that just started takes a while to start its job agent


def check_dashboard_url(address: str) -> str:
    """A Ray dashboard URL, http(s)://HEAD[:PORT]; SpecError in one line otherwise. Asked before the sweep is loaded
    or Ray imported: a mistyped address is the quickest thing to report."""
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # a port that is not a number, or out of range
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SpecError(f"--address '{address}': expected the Ray dashboard's URL, e.g. http://HEAD:8265")
    if not port_ok:
        raise SpecError(f"--address '{address}': the port is not a number from 1 to 65535")
    return address


def connect(address: str):
    from ray.job_submission import JobSubmissionClient

    check_dashboard_url(address)
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # unreachable, not a Ray dashboard, refused token
        raise SpecError(f"--address '{address}': cannot reach a Ray cluster there ({one_line(err, 200)})"
                        ) from None


def submit_sweep(sweep: SweepSpec, address: str) -> str:
    """Submit `deitlab sweep run` of the resolved spec as a Ray Job; returns the job's submission id."""
    import deitlab
    from deitlab.orchestration.sweep import JOB_ENV

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "Uploading package …" on every submission
    client = connect(address)
    job_id = f"deitlab-{sweep.name}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / SPEC_FILE).write_text(json.dumps(sweep.model_dump(mode="json", by_alias=True), indent=2),
                                           encoding="utf-8")
        env = {JOB_ENV: job_id}
        commit = git_commit()  # the job's copy of the package has no .git: its runs get the commit from here
        if commit:
            env[GIT_ENV] = commit
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                client.submit_job(
                    entrypoint=f"python -m deitlab sweep run {SPEC_FILE}",
                    submission_id=job_id,
                    runtime_env={"working_dir": tmp, "py_modules": [str(Path(deitlab.__file__).parent)],
                                 "env_vars": env},
                    metadata={SWEEP_METADATA: sweep.name},
                )
                return job_id
            except RuntimeError as err:
                text = " ".join(str(err).split())
                if "No available agent" in text and time.monotonic() < deadline:
                    time.sleep(2)
                    continue
                raise SpecError(f"--address '{address}': the Ray cluster refused the job ({text[:300]})") from None


def follow(address: str, job_id: str, write: Callable[[str], None], poll_s: float = 1.0) -> str:
    """Print the job's log as it grows until the job ends; returns its final status (SUCCEEDED, FAILED, STOPPED)."""
    client = connect(address)
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            write(logs[shown:])
            shown = len(logs)
        if status.is_terminal():
            return str(status.value)
        time.sleep(poll_s)


def sweep_jobs(address: str, name: str, running_only: bool = True) -> list:
    """The cluster's jobs that run sweep `name`, newest first."""
    client = connect(address)
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get(SWEEP_METADATA) == name]
    if running_only:
        jobs = [j for j in jobs if not j.status.is_terminal()]
    return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)


def stop_jobs(address: str, name: str) -> list[str]:
    client = connect(address)
    stopped = []
    for job in sweep_jobs(address, name):
        client.stop_job(job.submission_id)
        stopped.append(job.submission_id)
    return stopped
