"""`deitlab sweep plan | run | resume | extend | status | stop | submit`.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from deitlab.cli.app import (
    ExperimentOption,
    RayAddress,
    SetOption,
    SweepArg,
    TrackingOption,
    WorkdirOption,
    checked,
    err,
    handled,
    located_sweep,
    out,
    sweep_app,
    trial_table,
    workdir_overrides,
)
from deitlab.cli.train import print_plan
from deitlab.errors import SpecError
from deitlab.orchestration.jobs import check_dashboard_url, connect, follow, submit_sweep
from deitlab.orchestration.records import driver_state, trial_states
from deitlab.spec.loading import load_sweep, parse_set
from deitlab.tracking.names import DRIVER_TAG, JOB_TAG
from deitlab.tracking.store import Tracking


@sweep_app.command("plan")
@handled
def sweep_plan(sweep: Path, set_: SetOption = None, workdir: WorkdirOption = None) -> None:
    """Show the trials a sweep would run (after collapsing meaningless combinations), their packs and what the
    teacher-logit cache holds for them."""
    print_plan(load_sweep(sweep, {**parse_set(set_), **workdir_overrides(workdir, "experiment.run.")}))


@sweep_app.command("run")
@handled
def sweep_run(sweep: Path, workdir: Annotated[Optional[Path], typer.Option(help="work directory")] = None,
              set_: SetOption = None, ray_address: RayAddress = None) -> None:
    """Run a sweep here: one Ray Tune trial (one Ray Train run, one MLflow child run) per trial of the plan."""
    loaded = load_sweep(sweep, {**parse_set(set_), **workdir_overrides(workdir, "experiment.run.")})
    run_sweep_live(loaded, ray_address)


def run_sweep_live(loaded, ray_address: Optional[str] = None):
    """The sweep's preflight, then the sweep under the live table."""
    from deitlab.orchestration.sweep import planned_trials, run_sweep

    specs = planned_trials(loaded)
    found = checked(list(specs.values()), ray_address)
    return _drive(loaded, specs, f"sweep {loaded.name}", None,
                  lambda callbacks: run_sweep(loaded, callbacks=callbacks, checked=found))


def _drive(sweep, specs: dict, title: str, states, start):
    """Run `start(callbacks)` under the live table of the planned trials `specs`; then the summary. Exit 1 when
    trials failed."""
    from deitlab.orchestration.sweep import SweepInterrupted

    shown = {s.name: (s.state, s.epoch, s.value) for s in states or []}
    epochs = {name: spec.optim.epochs for name, spec in specs.items()}
    try:
        with trial_table(title, epochs, sweep.metric, sweep.mode, shown) as table:
            outcome = start([table])
    except SweepInterrupted as e:
        err.print(f"[yellow]stopped:[/] {e}", highlight=False)
        raise typer.Exit(130) from None
    from deitlab.report.files import log_summary
    with err.status("logging the summary report on the parent run…"):
        log_summary(Tracking.for_run(sweep.experiment.run), sweep.name, outcome.parent_run_id)
    _print_summary(sweep, outcome.states, outcome.parent_run_id)
    if outcome.failed:
        err.print(f"[red]error:[/] {len(outcome.failed)} of {len(outcome.states)} trials failed:"
                  f" {', '.join(outcome.failed)}", highlight=False)
        raise typer.Exit(1)
    return outcome


def _print_summary(sweep, states, parent_id: str) -> None:
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    scored = [s for s in states if s.state == "finished" and s.best is not None]
    line = f"sweep [bold]{sweep.name}[/] (MLflow parent run {parent_id}): " + \
        ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    out.print(line, highlight=False)
    if scored:
        best = (max if sweep.mode == "max" else min)(scored, key=lambda s: s.best)
        out.print(f"best trial: [bold]{best.name}[/]  best {sweep.metric} {best.best:.4f}"
                  f" (last epoch {best.value:.4f}), MLflow run {best.run_id}", highlight=False)


@sweep_app.command("resume")
@handled
def sweep_resume(sweep: SweepArg, workdir: WorkdirOption = None, tracking_uri: TrackingOption = None,
                 experiment: ExperimentOption = None, ray_address: RayAddress = None,
                 retry_errored: Annotated[bool, typer.Option("--retry-errored", help="also rerun failed trials,"
                                                             " from scratch")] = False) -> None:
    """Continue a sweep whose driver died or was stopped; finished trials are not run again."""
    from deitlab.orchestration.sweep import plan_resume

    name, tracking = located_sweep(sweep, workdir, tracking_uri, experiment)
    start = plan_resume(tracking, name, retry_errored)
    _continue(start, f"resuming sweep '{name}': {len(start.todo)} trial(s) to run"
              + (" (restoring its Tune run)" if start.restore else ""), "resumed", ray_address)


def _continue(start, message: str, how: str, ray_address: Optional[str]) -> None:
    """Run a resume or extend plan under the live table, with the states MLflow has for the trials already run."""
    from deitlab.orchestration.sweep import continue_sweep

    err.print(message, highlight=False, soft_wrap=True)
    found = checked([start.specs[name] for name in start.todo], ray_address)
    _drive(start.sweep, start.specs, f"sweep {start.sweep.name} ({how})",
           trial_states(start.tracking, start.parent, list(start.specs)),
           lambda callbacks: continue_sweep(start, callbacks, found))


@sweep_app.command("extend")
@handled
def sweep_extend(sweep: SweepArg, set_: SetOption = None, workdir: WorkdirOption = None,
                 tracking_uri: TrackingOption = None, experiment: ExperimentOption = None,
                 ray_address: RayAddress = None) -> None:
    """Add seeds, grid points or samples to an ended sweep (--set seeds=[0,1,2,3]); runs only the new trials."""
    from deitlab.orchestration.sweep import plan_extend

    name, tracking = located_sweep(sweep, workdir, tracking_uri, experiment)
    start = plan_extend(tracking, name, parse_set(set_))
    _continue(start, f"extending sweep '{name}' by {len(start.todo)} trial(s): {', '.join(start.todo)}", "extended",
              ray_address)


@sweep_app.command("status")
@handled
def sweep_status(sweep: SweepArg, workdir: WorkdirOption = None, tracking_uri: TrackingOption = None,
                 experiment: ExperimentOption = None,
                 address: Annotated[Optional[str], typer.Option(help="Ray dashboard URL: also show the sweep's Ray"
                                                                     " Jobs there")] = None) -> None:
    """The trials of a sweep and their states (from MLflow), its driver, and its Ray Jobs."""
    from rich.table import Table

    from deitlab.orchestration.sweep import planned_trials, recorded_sweep, trial_names_of

    name, tracking = located_sweep(sweep, workdir, tracking_uri, experiment)
    parent, recorded = recorded_sweep(tracking, name)
    names = list(planned_trials(recorded, trial_names_of(parent)))
    states = trial_states(tracking, parent, names, recorded.metric, recorded.mode, history=True)
    driver = driver_state(parent)
    out.print(f"sweep [bold]{name}[/]: MLflow parent run {parent.id} {parent.status}"
              + (f", driver {parent.tags.get(DRIVER_TAG, '?')} {driver}" if parent.status == "RUNNING"
                 else "")
              + (f", Ray job {parent.tags[JOB_TAG]}" if JOB_TAG in parent.tags else ""), highlight=False)
    if address:
        from deitlab.orchestration.jobs import sweep_jobs

        for job in sweep_jobs(address, name, running_only=False):
            out.print(f"  Ray job {job.submission_id}: {job.status.value}", highlight=False)
    table = Table(title_justify="left")
    for column in ("trial", "state", "epoch", recorded.metric, f"best {recorded.metric}", "MLflow run", "note"):
        table.add_column(column, justify="right" if column in ("epoch",) or recorded.metric in column else "left")
    for s in states:
        table.add_row(s.name, s.state, "—" if s.epoch is None else str(s.epoch),
                      "—" if s.value is None else f"{s.value:.4f}", "—" if s.best is None else f"{s.best:.4f}",
                      s.run_id or "—", s.note[:60])
    out.print(table)
    if parent.status == "RUNNING" and driver == "gone":
        out.print(f"the driver is gone: continue with `deitlab sweep resume {name}`", highlight=False)


@sweep_app.command("stop")
@handled
def sweep_stop(sweep: SweepArg, workdir: WorkdirOption = None, tracking_uri: TrackingOption = None,
               experiment: ExperimentOption = None,
               address: Annotated[Optional[str], typer.Option(help="Ray dashboard URL of a cluster the sweep was"
                                                                   " submitted to")] = None) -> None:
    """Stop a running sweep: its Ray Job (--address), or its driver on this machine. `sweep resume` continues it."""
    if address:
        from deitlab.orchestration.jobs import check_dashboard_url, stop_jobs
        from deitlab.spec.loading import load_sweep

        check_dashboard_url(address)
        name = load_sweep(sweep).name if sweep.endswith((".yaml", ".yml", ".json")) else sweep
        stopped = stop_jobs(address, name)
        if not stopped:
            raise SpecError(f"no running Ray job of sweep '{name}' at {address}")
        out.print(f"stopping Ray job(s) {', '.join(stopped)}", highlight=False)
        return
    name, tracking = located_sweep(sweep, workdir, tracking_uri, experiment)
    parent = tracking.sweep_parent(name)
    state = driver_state(parent)
    if state != "alive":
        where = parent.tags.get(DRIVER_TAG, "?")
        raise SpecError(f"sweep '{name}' has no running driver on this machine (parent run {parent.status},"
                        f" driver {where} {state}); for a submitted sweep give --address")
    os.kill(int(parent.tags[DRIVER_TAG].rpartition(":")[2]), signal.SIGINT)  # Tune saves its state and stops
    with err.status(f"stopping sweep '{name}'…"):
        for _ in range(240):
            if tracking.run(parent.id).status != "RUNNING":
                break
            time.sleep(0.5)
    out.print(f"stopped sweep '{name}'; continue it with `deitlab sweep resume {name}`", highlight=False)


@sweep_app.command("submit")
@handled
def sweep_submit(sweep: Path,
                 address: Annotated[str, typer.Option(help="the Ray cluster's dashboard URL, e.g. http://HEAD:8265")],
                 set_: SetOption = None, workdir: Annotated[Optional[Path], typer.Option(help="work directory")] = None,
                 no_wait: Annotated[bool, typer.Option("--no-wait", help="print the job id and return")] = False
                 ) -> None:
    """Submit a sweep to a Ray cluster as a Ray Job (entrypoint: the same `sweep run`) and follow its log."""
    check_dashboard_url(address)
    loaded = load_sweep(sweep, {**parse_set(set_), **workdir_overrides(workdir, "experiment.run.")})
    connect(address)
    run = loaded.experiment.run
    local = [what for what, value in (("run.tracking_uri", run.resolved_tracking_uri), ("run.storage",
                                                                                       run.resolved_storage))
             if not value.startswith(("http://", "https://", "s3://", "postgresql", "mysql"))]
    if local:
        err.print(f"note: {' and '.join(local)} are paths on this machine; the cluster writes there on its own"
                  " nodes. Use an MLflow server and s3:// storage for a remote cluster.", highlight=False, soft_wrap=True)
    job_id = submit_sweep(loaded, address)
    out.print(f"submitted sweep '{loaded.name}' as Ray job [bold]{job_id}[/]", highlight=False)
    if no_wait:
        out.print(f"follow it: deitlab sweep status {loaded.name} --address {address}", highlight=False)
        return
    try:
        status = follow(address, job_id, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    except KeyboardInterrupt:
        err.print(f"detached; the job keeps running. Stop it: deitlab sweep stop {loaded.name} --address {address}")
        raise typer.Exit(130) from None
    if status != "SUCCEEDED":
        err.print(f"[red]error:[/] Ray job {job_id} ended {status}", highlight=False)
        raise typer.Exit(1)
