"""Ray Tune adapter: a sweep is a list of named trials; each trial is one Ray Train run and one MLflow child run.

Ray 2.60 (Train V2) does not accept a TorchTrainer as a Tune trainable: each trial is a function that builds and fits
its own TorchTrainer, with TuneReportCallback forwarding the workers' reports to Tune (and so to ASHA). The driver
creates the MLflow experiment and the sweep's parent run before any trial starts (concurrent first use of a SQLite
store races), and records the resolved sweep spec on the parent run (`sweep.json`): `sweep resume`, `extend` and
`status` work from that record and need no spec file.

MLflow is the record of what finished. A trial whose MLflow run already finished is never trained again (Tune's own
state can lag a driver that was killed); an unfinished one continues from its last checkpoint in storage.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from deitlab.core import modes
from deitlab.core.checkpoints import Storage
from deitlab.errors import SpecError, one_line
from deitlab.orchestration.cluster import cluster_shapes, worker_resources
from deitlab.orchestration.packs import plan_packs, rungs_actor
from deitlab.orchestration.preflight import Checked, preflight
from deitlab.orchestration.records import TrialState, driver_state, runs_by_trial, trial_states
from deitlab.orchestration.train import common_tags
from deitlab.orchestration.trials import stop_recorder, sweep_trial, teacher_trial
from deitlab.spec.base import set_dotted, validate
from deitlab.spec.schema import ExperimentSpec, TeacherTrainingSpec
from deitlab.spec.sweep import TEACHER_KEY, SweepSpec
from deitlab.tracking.names import (
    DRIVER_TAG,
    EXTENSIONS_TAG,
    JOB_TAG,
    KIND_TAG,
    LAST_FAILURE_TAG,
    SPEC_HASH_TAG,
    SWEEP_TAG,
    TRIAL_NAMES_TAG,
    TRIALS_TAG,
    TUNE_RUN_TAG,
)
from deitlab.tracking.store import Tracking

log = logging.getLogger("deitlab.sweep")

# A trial is a Tune actor that holds its Ray Train controller; it lives on the head node and takes no CPU. A lost
# worker node (a reclaimed spot instance, a scale-down) then ends only Train workers, which Ray Train restarts from the
# last checkpoint, while the trial goes on; a CPU-less head (as the cluster configs set up) still hosts trials.
TRIAL_RESOURCES = {"cpu": 0, "node:__internal_head__": 0.001}
PLAN_ARTIFACT = "sweep.json"  # the resolved sweep spec, on the parent run
JOB_ENV = "DEITLAB_RAY_JOB_ID"  # set by `sweep submit` in the job's environment


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped before every trial ended (Ctrl-C, `sweep stop`); `sweep resume` continues it."""


TRIAL_NAMES = "2"  # the naming scheme of new sweeps, recorded on their parent (TRIAL_NAMES_TAG)


def trial_name(point: dict[str, Any], scheme: str = TRIAL_NAMES) -> str:
    """A readable, unique-per-point name: hard-convnet-l0.5-s0, soft-vit-t3-notoken-s0, none-s0. A switch reads as
    its name or no+name (scheme 2); scheme 1, the names of sweeps recorded before, wrote tokenTrue / tokenFalse."""
    mode = point.get("distillation.mode")
    parts = [str(mode)] if mode else []
    if (mode is None or modes.describe(mode).needs_teacher) and TEACHER_KEY in point:
        parts.append(str(point[TEACHER_KEY]))
    short = {"distillation.tau": "t", "distillation.lambda": "l", "distillation.token": "token"}
    for key, value in point.items():
        if key in ("distillation.mode", TEACHER_KEY, "run.seed"):
            continue
        label = short.get(key, key.rsplit(".", 1)[-1])
        if isinstance(value, bool) and scheme != "1":
            parts.append(label if value else f"no{label}")
            continue
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{label}{shown}")
    parts.append(f"s{point.get('run.seed', 0)}")
    return "-".join(parts)


def planned_trials(sweep: SweepSpec, scheme: str = TRIAL_NAMES) -> dict[str, ExperimentSpec]:
    """Every trial of the sweep by name (in the naming `scheme` its parent recorded), validated."""
    return {trial_name(p, scheme): sweep.trial_spec(p) for p in sweep.trial_overrides()}


def trial_names_of(parent) -> str:
    """The naming scheme of a recorded sweep: what its trials' runs are called, so resume and extend find them."""
    return parent.tags.get(TRIAL_NAMES_TAG, "1")


def spec_hash(sweep: SweepSpec) -> str:
    return hashlib.sha256(sweep.model_dump_json(by_alias=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ trials
def _fitting_trials(run) -> int:
    """How many trials the cluster can run at once (at its largest, when it autoscales); more would only start trial
    processes that wait for workers."""
    shapes, _, unknown_nodes = cluster_shapes()
    if unknown_nodes:
        return 10_000  # the autoscaler adds nodes as trials wait for them: max_concurrent (or the plan) decides
    fits = float("inf")
    for name, amount in worker_resources(run).items():
        # a worker's bundle sits on one node: count whole bundles per node
        bundles = sum(count * (node.get(name, 0.0) // amount) for node, count in shapes
                      if node.get(name, 0.0) >= amount)
        fits = min(fits, bundles // run.workers)
    return max(int(min(fits, 10_000)), 1)


def concurrency(sweep: SweepSpec) -> int:
    """Trials at once: what fits the cluster, capped by the spec's max_concurrent."""
    fits = _fitting_trials(sweep.experiment.run)
    return min(fits, sweep.max_concurrent_trials) if sweep.max_concurrent_trials else fits


def _run_tuner(trial_fn, names: list[str], run, tune_name: str, max_concurrent: int, callbacks: list | None,
               scheduler=None, restore: bool = False, retry_errored: bool = False):
    """A Tune grid over trial names (or the restored one), each trial a function that fits its own TorchTrainer."""
    from ray import tune


    storage = Storage.open(run.resolved_storage)
    trainable = tune.with_resources(trial_fn, TRIAL_RESOURCES)
    if restore:  # its param space, scheduler and callbacks come from the saved state
        return tune.Tuner.restore(f"{storage.root}/{tune_name}", trainable=trainable, resume_unfinished=True,
                                  restart_errored=retry_errored, storage_filesystem=storage.filesystem).fit()
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(names)},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, scheduler=scheduler),
        run_config=tune.RunConfig(name=tune_name, storage_path=storage.root, storage_filesystem=storage.filesystem,
                                  callbacks=callbacks or [], verbose=0),
    ).fit()


def _can_restore(run, tune_name: str) -> bool:
    from ray import tune


    storage = Storage.open(run.resolved_storage)
    try:
        return tune.Tuner.can_restore(f"{storage.root}/{tune_name}", storage_filesystem=storage.filesystem)
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------ workflows
@dataclass(frozen=True)
class SweepOutcome:
    parent_run_id: str
    trials: list[str]  # the trials this start ran (or skipped as already done)
    failed: list[str]
    states: list[TrialState]  # every planned trial, as MLflow has it at the end


def _asha(sweep: SweepSpec, specs: dict[str, ExperimentSpec]):
    if sweep.early_stopping is None:
        return None
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class ASHA(ASHAScheduler):
        """ASHA that never stops a trial at its last epoch: the trial closes its own MLflow run as FINISHED."""

        def __init__(self, epochs: dict[str, int], **kwargs):
            super().__init__(**kwargs)
            self.epochs = epochs

        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)  # records the rung either way
            if result.get("epoch", 0) >= self.epochs.get(trial.config.get("trial"), float("inf")):
                return TrialScheduler.CONTINUE
            return decision

    return ASHA({n: s.optim.epochs for n, s in specs.items()}, time_attr="epoch", metric=sweep.metric,
                mode=sweep.mode, max_t=max(s.optim.epochs for s in specs.values()),
                grace_period=sweep.early_stopping.grace_period,
                reduction_factor=sweep.early_stopping.reduction_factor)


def _execute(sweep: SweepSpec, specs: dict[str, ExperimentSpec], tracking: Tracking, parent_id: str,
             names: list[str], tune_name: str, callbacks: list | None, teachers: dict[str, dict[str, Any]],
             restore: bool = False, retry_errored: bool = False) -> SweepOutcome:
    """Run `names` of the planned `specs` (or restore `tune_name`) under the parent run; close the parent with what
    happened."""
    from ray import tune

    tags = {TUNE_RUN_TAG: tune_name, DRIVER_TAG: f"{socket.gethostname()}:{os.getpid()}", TRIALS_TAG: len(specs)}
    if os.environ.get(JOB_ENV):
        tags[JOB_TAG] = os.environ[JOB_ENV]
    tracking.set_tags(parent_id, tags)
    units = {name: [name] for name in names}
    packed = sweep.pack > 1
    rungs = actor = scheduler = None
    trial_callbacks = list(callbacks or [])
    if packed:
        # The plan is recorded: a restored Tune run knows its trials by these pack names.
        plan_file = f"packs/{tune_name}.json"
        if restore:
            units = tracking.read_json(parent_id, plan_file)
        else:
            units = plan_packs({n: specs[n] for n in names}, sweep.pack)
            tracking.log_json(parent_id, plan_file, units)
        if sweep.early_stopping is not None:  # ASHA's rule per member (Tune's ASHA would stop whole packs)
            rungs = f"deitlab-rungs-{parent_id}"
            actor = rungs_actor(rungs, sweep.early_stopping.grace_period, sweep.early_stopping.reduction_factor,
                                max(s.optim.epochs for s in specs.values()), sweep.mode)
    else:
        scheduler = _asha(sweep, specs)
        trial_callbacks.insert(0, stop_recorder(tracking, parent_id, specs, sweep.metric))
    for callback in trial_callbacks:  # the live table (progress.py) shows a pack's members, not the pack
        if hasattr(callback, "on_packs"):
            callback.on_packs(units)
    trial_fn = tune.with_parameters(sweep_trial, sweep_name=sweep.name, specs=specs, units=units, tracking=tracking,
                                    parent_id=parent_id, teachers=teachers, metric=sweep.metric, rungs=rungs,
                                    packed=packed)
    try:
        results = _run_tuner(trial_fn, list(units), sweep.experiment.run, tune_name, concurrency(sweep),
                             trial_callbacks, scheduler, restore, retry_errored)
    except BaseException:
        _close_interrupted(tracking, parent_id)
        raise
    finally:
        if actor is not None:
            import ray

            ray.kill(actor)
    # A trial whose process died (out of memory, a lost node) could not close its MLflow run: Tune knows why.
    errors = {member: r.error for r in results if r.error is not None for member in units.get(r.config["trial"], [])}
    for name, runs in runs_by_trial(tracking, parent_id).items():
        if name in errors and runs and runs[0].status == "RUNNING":
            text = one_line(errors[name], 250)
            tracking.try_set_tags(runs[0].id, {LAST_FAILURE_TAG: text})
            tracking.end_run(runs[0].id, "FAILED")
    parent = tracking.run(parent_id)
    states = trial_states(tracking, parent, list(specs), sweep.metric, sweep.mode, history=True)
    if any(s.state in ("pending", "running", "interrupted") for s in states if s.name in names):
        _close_interrupted(tracking, parent_id)  # Tune returns normally after Ctrl-C / `sweep stop`
        raise SweepInterrupted(f"sweep '{sweep.name}' was stopped; continue it with `deitlab sweep resume {sweep.name}`")
    failed = [s.name for s in states if s.state == "failed"]
    tracking.end_run(parent_id, "FAILED" if failed else "FINISHED")
    return SweepOutcome(parent_id, names, failed, states)


def _close_interrupted(tracking: Tracking, parent_id: str) -> None:
    """The parent and the trials that were running end KILLED: nothing is left RUNNING for a dead driver."""
    for run in tracking.child_runs(parent_id):
        if run.status == "RUNNING":
            tracking.end_run(run.id, "KILLED")
    tracking.end_run(parent_id, "KILLED")


def run_sweep(sweep: SweepSpec, callbacks: list | None = None, checked: Checked | None = None) -> SweepOutcome:
    """Run every trial of the sweep under a new MLflow parent run; trial failures are returned, not raised.
    `checked`: the command's preflight (else it runs here, before anything is written)."""
    specs = planned_trials(sweep)
    checked = checked or preflight(list(specs.values()))
    tracking = Tracking.for_run(sweep.experiment.run)
    tracking.experiment_id()
    parent_id = tracking.start_run(sweep.name, tags={SWEEP_TAG: sweep.name, KIND_TAG: "sweep",
                                                     SPEC_HASH_TAG: spec_hash(sweep), TRIAL_NAMES_TAG: TRIAL_NAMES,
                                                     **common_tags(sweep.experiment.run)},
                                   params={"sweep.metric": sweep.metric, "sweep.mode": sweep.mode,
                                           "sweep.early_stopping": sweep.early_stopping})
    tracking.log_json(parent_id, PLAN_ARTIFACT, sweep.model_dump(mode="json", by_alias=True))
    return _execute(sweep, specs, tracking, parent_id, list(specs), f"{sweep.name}-{parent_id[:8]}", callbacks,
                    checked.teachers)


def recorded_sweep(tracking: Tracking, name: str):
    """(parent run, the SweepSpec it recorded) of the newest sweep called `name`."""
    parent = tracking.sweep_parent(name)
    raw = tracking.read_json(parent.id, PLAN_ARTIFACT)
    sweep = validate(SweepSpec, raw, source=f"sweep '{name}' (recorded on run {parent.id})")
    return parent, sweep


@dataclass(frozen=True)
class SweepStart:
    """A checked plan to continue a recorded sweep: what `sweep resume` and `sweep extend` run."""

    sweep: SweepSpec
    specs: dict[str, ExperimentSpec]  # every planned trial, by name
    tracking: Tracking
    parent: Any  # the MLflow parent run
    todo: list[str]
    tune_name: str
    restore: bool = False
    retry_errored: bool = False
    extension: int = 0  # > 0: the plan adds trials, recorded on the parent as extension N


def plan_resume(tracking: Tracking, name: str, retry_errored: bool = False) -> SweepStart:
    """Continue the newest sweep called `name`: its Tune run is restored; finished trials are not run again.

    Interrupted trials continue from their last checkpoint; failed ones run again (from scratch, as a new MLflow run
    beside the failed one) only with `retry_errored`.
    """
    parent, sweep = recorded_sweep(tracking, name)
    specs = planned_trials(sweep, trial_names_of(parent))
    states = trial_states(tracking, parent, list(specs))
    failed = [s.name for s in states if s.state == "failed"]
    todo = [s.name for s in states if not s.done and (retry_errored or s.state != "failed")]
    if not todo:
        hint = f"; rerun its {len(failed)} failed trial(s) with --retry-errored" if failed else \
            "; add trials with `deitlab sweep extend`"
        raise SpecError(f"sweep '{name}': nothing to resume, every trial has ended{hint}")
    if driver_state(parent) == "alive":
        raise SpecError(f"sweep '{name}' is still running (driver {parent.tags[DRIVER_TAG]});"
                        f" stop it first with `deitlab sweep stop {name}`")
    tune_name = parent.tags.get(TUNE_RUN_TAG, "")
    restore = bool(tune_name) and _can_restore(sweep.experiment.run, tune_name)
    if not restore:  # the driver died before Tune saved its state: a new Tune run over what is left
        tune_name = f"{sweep.name}-{parent.id[:8]}-r{len(todo)}"
    return SweepStart(sweep, specs, tracking, parent, todo, tune_name, restore, retry_errored)


def plan_extend(tracking: Tracking, name: str, overrides: dict[str, Any]) -> SweepStart:
    """Add seeds, grid points or samples to an ended sweep; only the new trials run, under the same parent run."""
    parent, old = recorded_sweep(tracking, name)
    if parent.status == "RUNNING":
        raise SpecError(f"sweep '{name}' has not ended; finish it with `deitlab sweep resume {name}` first")
    if not overrides:
        raise SpecError("sweep extend: give what to add with --set, e.g. --set 'seeds=[0,1,2,3,4]'")
    raw = old.model_dump(mode="json", by_alias=True)
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    new = validate(SweepSpec, raw, source="sweep extend --set")
    if new.name != old.name or new.experiment != old.experiment:
        raise SpecError("sweep extend: only grid, space, samples, seeds and new teachers can change; the base"
                        " experiment and the name are what make the old and new trials comparable")
    changed = [t for t, spec in old.teachers.items() if new.teachers.get(t) != spec]
    if changed or (new.metric, new.mode) != (old.metric, old.mode):
        raise SpecError(f"sweep extend: {'teacher ' + ', '.join(changed) if changed else 'metric and mode'} cannot"
                        " change; add teachers under new names")
    existing = runs_by_trial(tracking, parent.id)
    specs = planned_trials(new, trial_names_of(parent))
    added = [n for n in specs if n not in existing]
    if not added:
        raise SpecError(f"sweep extend: the changes add no trial to sweep '{name}'")
    extension = int(parent.tags.get(EXTENSIONS_TAG, "0")) + 1
    return SweepStart(new, specs, tracking, parent, added, f"{name}-{parent.id[:8]}-x{extension}",
                      extension=extension)


def continue_sweep(start: SweepStart, callbacks: list | None = None, checked: Checked | None = None) -> SweepOutcome:
    """Run a resume or extend plan under the sweep's parent run."""
    checked = checked or preflight([start.specs[n] for n in start.todo])
    parent_id = start.parent.id
    start.tracking.reopen_run(parent_id)
    if start.extension:
        start.tracking.log_json(parent_id, PLAN_ARTIFACT, start.sweep.model_dump(mode="json", by_alias=True))
        start.tracking.set_tags(parent_id, {EXTENSIONS_TAG: start.extension, SPEC_HASH_TAG: spec_hash(start.sweep)})
    return _execute(start.sweep, start.specs, start.tracking, parent_id, start.todo, start.tune_name, callbacks,
                    checked.teachers, start.restore, start.retry_errored)


def train_teachers(specs: list[TeacherTrainingSpec], callbacks: list | None = None,
                   checked: Checked | None = None) -> list[str]:
    """Train and register several teachers at once (one Tune trial each). Returns the names that failed."""
    from ray import tune

    if checked is None:
        preflight(specs)
    by_name = {s.name: s for s in specs}
    run = specs[0].run
    Tracking.for_run(run).experiment_id()
    results = _run_tuner(tune.with_parameters(teacher_trial, specs=by_name), list(by_name), run,
                         f"teachers-{'-'.join(by_name)}"[:80], _fitting_trials(run), callbacks)
    return [r.config["trial"] for r in results if r.error is not None]
