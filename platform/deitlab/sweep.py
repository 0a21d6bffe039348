"""Ray Tune adapter: a sweep is a grid of trial overrides; each trial is one Ray Train run and one MLflow child run.

Ray 2.60 (Train V2) does not accept a TorchTrainer as a Tune trainable: each trial is a function that builds and fits
its own TorchTrainer, with TuneReportCallback forwarding the workers' reports to Tune. The driver creates the MLflow
experiment and the sweep's parent run before any trial starts (concurrent first use of a SQLite store races).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .ray_train import check_fits, preflight_teachers, tracked_fit, train_teacher
from .spec import TEACHER_KEY, ExperimentSpec, SweepSpec, TeacherTrainingSpec
from .tracking import KIND_TAG, SWEEP_TAG, Tracking

# The trial function only waits on its TorchTrainer; a sliver of a CPU keeps it from starving the workers.
TRIAL_CPU = 0.01


def trial_name(point: dict[str, Any]) -> str:
    """A readable, unique-per-point name: hard-convnet-l0.5-s0, soft-vit-t3-l0.1-s0, none-s0."""
    mode = point.get("distillation.mode")
    parts = [str(mode)] if mode else []
    if mode != "none" and TEACHER_KEY in point:
        parts.append(str(point[TEACHER_KEY]))
    short = {"distillation.tau": "t", "distillation.lambda": "l", "distillation.token": "token"}
    for key, value in point.items():
        if key in ("distillation.mode", TEACHER_KEY, "run.seed"):
            continue
        parts.append(f"{short.get(key, key.rsplit('.', 1)[-1])}{value}")
    parts.append(f"s{point.get('run.seed', 0)}")
    return "-".join(parts)


def _sweep_trial(config: dict[str, Any], sweep: SweepSpec, specs: dict[str, ExperimentSpec], tracking: Tracking,
                 parent_id: str) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    name = config["trial"]
    spec = specs[name]  # validated by the driver; trials do not re-validate
    tags = {SWEEP_TAG: sweep.name, KIND_TAG: "trial", "deitlab.trial_id": tune.get_context().get_trial_id(),
            "deitlab.teacher_role": "reference" if spec.distillation.mode == "none" else "distillation"}
    tracked_fit(spec, tracking, name, tags, callbacks=[TuneReportCallback()], parent_id=parent_id)


def _teacher_trial(config: dict[str, Any], specs: dict[str, TeacherTrainingSpec]) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    train_teacher(specs[config["trial"]], callbacks=[TuneReportCallback()])


def _fitting_trials(run) -> int:
    """How many trials the cluster can run at once; more would only start trial processes that wait for workers."""
    import ray

    free = ray.cluster_resources()
    fits = free.get("CPU", 1) // (run.workers * run.cpus_per_worker + TRIAL_CPU)
    if run.gpus_per_worker > 0:
        fits = min(fits, free.get("GPU", 0) // (run.workers * run.gpus_per_worker))
    return max(int(fits), 1)


def _run_trials(trial_fn, names: list[str], run, tune_name: str, max_concurrent: int | None,
                callbacks: list | None) -> list[str]:
    """A Tune grid over trial names, each trial a function that fits its own TorchTrainer. Returns failed names."""
    from ray import tune

    from .checkpoints import Storage

    storage = Storage.open(run.resolved_storage)
    tuner = tune.Tuner(
        tune.with_resources(trial_fn, {"cpu": TRIAL_CPU}),
        param_space={"trial": tune.grid_search(names)},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent or _fitting_trials(run)),
        run_config=tune.RunConfig(name=tune_name, storage_path=storage.root, storage_filesystem=storage.filesystem,
                                  callbacks=callbacks or [], verbose=0),
    )
    return [r.config["trial"] for r in tuner.fit() if r.error is not None]


@dataclass(frozen=True)
class SweepOutcome:
    parent_run_id: str
    trials: list[str]
    failed: list[str]


def run_sweep(sweep: SweepSpec, callbacks: list | None = None,
              on_start: Callable[[list[str], str], None] | None = None) -> SweepOutcome:
    """Run every trial of the sweep under one MLflow parent run; trial failures are returned, not raised."""
    from ray import tune

    run = sweep.experiment.run
    tracking = Tracking.for_run(run)
    tracking.experiment_id()
    specs = {trial_name(p): sweep.trial_spec(p) for p in sweep.trial_overrides()}
    for spec in specs.values():
        check_fits(spec.run, TRIAL_CPU)
    preflight_teachers(list({s.teacher.label: s.teacher for s in specs.values() if s.teacher}.values()),
                       sweep.experiment.data, tracking)
    parent_id = tracking.start_run(sweep.name, tags={SWEEP_TAG: sweep.name, KIND_TAG: "sweep"},
                                   params={"sweep.trials": len(specs), "sweep.seeds": sweep.seeds,
                                           "sweep.grid": sweep.grid, "sweep.teachers": list(sweep.teachers),
                                           "sweep.metric": sweep.metric})
    if on_start:
        on_start(list(specs), parent_id)
    trial_fn = tune.with_parameters(_sweep_trial, sweep=sweep, specs=specs, tracking=tracking, parent_id=parent_id)
    try:
        failed = _run_trials(trial_fn, list(specs), run, f"{sweep.name}-{parent_id[:8]}",
                             sweep.max_concurrent_trials, callbacks)
    except BaseException:
        tracking.end_run(parent_id, "KILLED")
        raise
    tracking.end_run(parent_id, "FAILED" if failed else "FINISHED")
    return SweepOutcome(parent_id, list(specs), failed)


def train_teachers(specs: list[TeacherTrainingSpec], callbacks: list | None = None) -> list[str]:
    """Train and register several teachers at once (one Tune trial each). Returns the names that failed."""
    from ray import tune

    by_name = {s.name: s for s in specs}
    for spec in specs:
        check_fits(spec.run, TRIAL_CPU)
    run = specs[0].run
    Tracking.for_run(run).experiment_id()
    return _run_trials(tune.with_parameters(_teacher_trial, specs=by_name), list(by_name), run,
                       f"teachers-{'-'.join(by_name)}"[:80], None, callbacks)
