"""Ray Tune trials: one function trains a sweep's unit (a trial, or a pack of trials) through the Ray Train adapter;
another trains a teacher. Tune pickles them with their parameters (tune.with_parameters) and runs them in trial
actors; the driver side of a sweep is sweep.py.

A trial whose MLflow run already ended is never trained again (Tune's own state can lag a driver that was killed);
an unfinished one is reopened and continues from its unit's last checkpoint in storage.
"""
from __future__ import annotations

from typing import Any

from deitlab.orchestration.records import is_done, runs_by_trial
from deitlab.orchestration.train import (
    TrainUnit,
    UnitMember,
    fill_from_checkpoint,
    open_run,
    run_tags,
    run_unit,
    teacher_params,
    train_teacher,
)
from deitlab.spec.schema import ExperimentSpec, TeacherTrainingSpec
from deitlab.tracking.names import (
    KIND_TAG,
    PACK_SIZE_TAG,
    PACK_TAG,
    STOPPED_TAG,
    SWEEP_TAG,
    TEACHER_ROLE_TAG,
    TRIAL_ID_TAG,
)
from deitlab.tracking.store import Tracking


def sweep_trial(config: dict[str, Any], sweep_name: str, specs: dict[str, ExperimentSpec], units: dict[str, list[str]],
                tracking: Tracking, parent_id: str, teachers: dict[str, dict[str, Any]], metric: str,
                rungs: str | None = None, packed: bool = False) -> None:
    """One Tune trial: the unit `config["trial"]` of `units` (unit name → its trials' names). Opens or reopens each
    trial's MLflow child run, then fits one TorchTrainer for all of them (`packed`: as a pack, which reports its best
    member to Tune and whose members ASHA's rule stops one by one through the `rungs` actor)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    unit_name = config["trial"]
    names = units[unit_name]
    by_name = runs_by_trial(tracking, parent_id)
    members, ended = [], []
    for name in names:
        spec = specs[name]  # validated by the driver; trials do not re-validate
        runs = by_name.get(name, [])
        done = next((r for r in runs if is_done(r)), None)
        if done is not None:  # it ended before the driver died, after Tune last saved its state: never train again
            ended.append(done)
            continue
        unfinished = next((r for r in runs if r.status in ("RUNNING", "KILLED")), None)
        tags = {SWEEP_TAG: sweep_name, KIND_TAG: "trial", TRIAL_ID_TAG: tune.get_context().get_trial_id(),
                TEACHER_ROLE_TAG: "distillation" if spec.distillation.spec_mode.needs_teacher else "reference",
                **({PACK_TAG: unit_name, PACK_SIZE_TAG: len(names)} if packed else {}), **run_tags(spec, teachers)}
        run_id = open_run(tracking, spec, name, tags, parent_id, resume_run_id=unfinished.id if unfinished else None,
                          params=teacher_params(spec, teachers))
        members.append(UnitMember(name, spec, run_id))
    if not members:
        tune.report(dict(ended[0].metrics) if ended and not packed else {"epoch": 0})
        return
    if packed:
        unit = TrainUnit(tuple(members), tracking, f"{unit_name}-{parent_id[:8]}", metric, rungs, packed=True)
    else:
        unit = TrainUnit.single(members[0].spec, tracking, members[0].run_id, members[0].name)
    run_unit(unit, callbacks=[TuneReportCallback()])


def teacher_trial(config: dict[str, Any], specs: dict[str, TeacherTrainingSpec]) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    train_teacher(specs[config["trial"]], callbacks=[TuneReportCallback()])


def stop_recorder(tracking: Tracking, parent_id: str, specs: dict[str, ExperimentSpec], metric: str):
    """A driver-side Tune callback: a trial that ended before its last epoch was stopped by Tune's ASHA; say so in
    MLflow.

    Tune ends a stopped trial's process (and with it its Train run), so the trial cannot record this itself.
    """
    from ray.tune import Callback

    # Only plain values: Tune pickles its callbacks into its saved state (tuner.pkl, in run storage), and the specs
    # hold the user's run.tags, which are redacted in MLflow but would be verbatim there.
    epochs = {name: spec.optim.epochs for name, spec in specs.items()}
    storages = {name: spec.run.resolved_storage for name, spec in specs.items()}

    class StopRecorder(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            name = trial.config.get("trial")
            result = trial.last_result or {}
            epoch = int(result.get("epoch", 0))
            if name not in epochs or epoch >= epochs[name]:
                return
            for run in runs_by_trial(tracking, parent_id).get(name, []):
                if run.status == "RUNNING":
                    value = result.get(metric)
                    shown = f"{value:.4f}" if isinstance(value, float) else "?"
                    # Its workers were ended with the trial: what rank 0 had not yet sent is in the checkpoint.
                    fill_from_checkpoint(tracking, run.id, storages[name], name)
                    tracking.try_set_tags(run.id, {
                        STOPPED_TAG: f"ASHA at epoch {epoch} of {epochs[name]} ({metric} {shown})"})
                    tracking.end_run(run.id, "KILLED")

    return StopRecorder()
