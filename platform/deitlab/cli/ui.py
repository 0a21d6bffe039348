"""`deitlab ui`: the MLflow UI on the project's store, and the address of a sweep's experiment in it.

A work directory's SQLite store (or a database URI) is served by `mlflow server` started here, in the foreground until
Ctrl-C; a tracking server (http/https) already serves its UI, so only the address is printed.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Optional

import typer

from deitlab.cli.app import TrackingOption, WorkdirOption, app, checked_tracking_uri, err, handled, out
from deitlab.errors import SpecError
from deitlab.spec.schema import RunSpec
from deitlab.tracking.store import Tracking

# What the address opens: the runs table of MLflow's "Model training" view (MLflow 3 opens the GenAI one otherwise).
RUNS_VIEW = "runs?workflowType=machine_learning"
STARTUP_S = 300  # `mlflow server` imports for tens of seconds on a loaded 2-core machine


@app.command()
@handled
def ui(sweep: Annotated[Optional[str], typer.Argument(help="the sweep whose experiment to open (default: the newest"
                                                           " sweep in the store)")] = None,
       workdir: WorkdirOption = None, tracking_uri: TrackingOption = None,
       port: Annotated[int, typer.Option(help="port of the UI (on 127.0.0.1)", min=1, max=65535)] = 5000,
       host: Annotated[str, typer.Option(help="address to serve on (0.0.0.0: every interface)")] = "127.0.0.1") -> None:
    """Start the MLflow UI on the project's store and print the address of the sweep's experiment."""
    if workdir and tracking_uri:
        raise SpecError("give --workdir or --tracking-uri, not both")
    uri = checked_tracking_uri(tracking_uri) if tracking_uri else None
    run = RunSpec(workdir=str(workdir)) if workdir else RunSpec()
    if uri is None and not (run.workdir_path / "mlflow.db").is_file():
        raise SpecError(f"no MLflow store at {run.workdir_path / 'mlflow.db'} (give --workdir or --tracking-uri)")
    tracking = Tracking.reader(run.model_copy(update={"tracking_uri": uri} if uri else {}))
    remote = tracking.tracking_uri.startswith(("http://", "https://"))  # a server: its UI is there already
    if not remote and _in_use(host, port):
        raise SpecError(f"--port {port}: something already listens there; choose another port")
    experiment_id, name = _sweep_experiment(tracking, sweep)
    if remote:
        out.print(_address(tracking.tracking_uri, experiment_id), highlight=False, soft_wrap=True)
        return
    server = _start_server(tracking, host, port)
    failed = True  # until Ctrl-C ends it: a server that would not start or died keeps its log for the user
    try:
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        _wait_until_up(server, base)
        err.print(f"MLflow UI of {tracking.tracking_uri} (sweep '{name}'): group the runs by deitlab.teacher"
                  " (Group by), then the chart view; Ctrl-C stops it", highlight=False, soft_wrap=True)
        out.print(_address(base, experiment_id), highlight=False, soft_wrap=True)
        sys.stdout.flush()
        server.wait()
        err.print(f"mlflow server exited with {server.returncode}; its log: {server.log_path}",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        failed = False
    finally:
        _stop(server, keep_log=failed)


def _sweep_experiment(tracking: Tracking, sweep: str | None) -> tuple[str, str]:
    """(experiment id, sweep name) of `sweep`, or of the newest sweep in the store."""
    if sweep is None:
        sweep, experiment = tracking.newest_sweep() or (None, None)
    else:
        experiment = tracking.sweep_experiment(sweep)
    if experiment is None:
        what = f"no sweep '{sweep}'" if sweep else "no sweep"
        raise SpecError(f"{what} in the MLflow store at {tracking.tracking_uri}: run one (`deitlab sweep run`) or name"
                        " one that is there")
    return tracking.client.get_experiment_by_name(experiment).experiment_id, sweep


def _address(base: str, experiment_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/{RUNS_VIEW}"


def _in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "::") else host, port)) == 0


def _start_server(tracking: Tracking, host: str, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # GenAI jobs: a second process tree the UI does not need
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking.tracking_uri,
               "--host", host, "--port", str(port), "--workers", "1"]
    log = tempfile.NamedTemporaryFile("w", prefix="deitlab-ui-", suffix=".log", delete=False)  # its access log
    # Its own session: Ctrl-C here ends it through _stop, once
    server = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    server.log_path = Path(log.name)  # type: ignore[attr-defined]
    log.close()
    return server


def _wait_until_up(server: subprocess.Popen, base: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            lines = server.log_path.read_text(errors="replace").strip().splitlines()  # type: ignore[attr-defined]
            raise SpecError(f"mlflow server exited with {server.returncode} before answering"
                            f"{': ' + lines[-1] if lines else ''} (its log: {server.log_path})")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise SpecError(f"mlflow server did not answer at {base} within {STARTUP_S} s (its log: {server.log_path})")


def _stop(server: subprocess.Popen, keep_log: bool) -> None:
    """End the server (its whole process group); remove its log unless asked to keep it."""
    if server.poll() is None:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if not keep_log:
        server.log_path.unlink(missing_ok=True)  # type: ignore[attr-defined]
