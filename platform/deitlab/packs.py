"""Packed sweep trials (Ray adapter): trials that share a teacher, data and batch schedule train as one Ray Train run.

With `pack: K` in a sweep spec the planner groups trials by engine.pack_key into packs of up to K. A pack is one Tune
trial and one TorchTrainer: every batch is loaded, augmented and passed through the teacher once, and feeds each
member's own step (step.Student). Each member keeps everything a trial alone has: its MLflow child run (same name,
params and tags, plus deitlab.pack), per-epoch and step metrics, system metrics, curves, confusion matrix and best
model. A member whose loss stops being finite fails alone; the rest of its pack goes on.

Early stopping inside packs: Tune's ASHA can only stop whole Tune trials, so packed sweeps apply ASHA's rule per
member. One `Rungs` actor per sweep holds every member's value at each rung (grace × factor^k epochs); rank 0 of each
pack asks it at rung epochs and stops members outside the top 1/factor so far, recorded as a trial stopped by ASHA.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoints import Storage, write_checkpoint
from .errors import one_line
from .ray_train import (TrainJob, _read_json, _restore, _system_metrics, _worker_nodes, common_tags,
                        fill_from_history, open_run_log, resolve_init_file, resolve_teacher_file, run_tags,
                        scaling_config)
from .spec import ExperimentSpec
from .step import DIVERGED_REASON
from .tracking import DIVERGED_TAG, KIND_TAG, STOPPED_TAG, SWEEP_TAG, MetricLogger, Tracking

log = logging.getLogger("deitlab.packs")

MEMBERS_DIR = "members"  # a pack checkpoint: state.pt (every member) + members/<name>/{history,confusion}.json
PACK_TAG = "deitlab.pack"
PACK_SIZE_TAG = "deitlab.pack_size"


def plan_packs(specs: dict[str, ExperimentSpec], size: int) -> dict[str, list[str]]:
    """Tune trials → member trial names: trials with equal pack keys, in plan order, in groups of up to `size`.
    A group of one keeps its trial's name; a pack is named after its first member and its size."""
    from .engine import pack_key

    groups: dict[str, list[str]] = {}
    for name, spec in specs.items():
        groups.setdefault(pack_key(spec), []).append(name)
    units: dict[str, list[str]] = {}
    for names in groups.values():
        for i in range(0, len(names), size):
            chunk = names[i:i + size]
            units[chunk[0] if len(chunk) == 1 else f"pack-{chunk[0]}+{len(chunk) - 1}"] = chunk
    return units


# ------------------------------------------------------------------------------------------------ ASHA per member
class Rungs:
    """ASHA's rule for members of packs (a Ray actor, one per sweep): at epoch grace × factor^k, a member continues
    when its value is within the best 1/factor of the values recorded at that rung so far."""

    def __init__(self, grace_period: int, reduction_factor: float, max_t: int, mode: str):
        self.milestones, epoch = [], grace_period
        while epoch < max_t:
            self.milestones.append(round(epoch))
            epoch *= reduction_factor
        self.factor, self.mode = reduction_factor, mode
        self.recorded: dict[int, list[float]] = {m: [] for m in self.milestones}

    def keep(self, epoch: int, value: float) -> bool:
        import numpy as np

        if epoch not in self.recorded:
            return True
        signed = value if self.mode == "max" else -value
        self.recorded[epoch].append(signed)
        return signed >= np.nanpercentile(self.recorded[epoch], (1 - 1 / self.factor) * 100)  # as Tune's ASHA


def rungs_actor(name: str, grace_period: int, reduction_factor: float, max_t: int, mode: str):
    import ray

    return ray.remote(num_cpus=0)(Rungs).options(name=name, get_if_exists=True).remote(
        grace_period, reduction_factor, max_t, mode)


# ------------------------------------------------------------------------------------------------ the worker
@dataclass(frozen=True)
class PackJob:
    """What a pack's workers need: the members' specs and MLflow runs, the Ray run name, the sweep's rungs actor."""

    specs: dict[str, ExperimentSpec]
    tracking: Tracking
    run_ids: dict[str, str]
    name: str
    metric: str = "acc"
    rungs: str | None = None  # the Rungs actor's name; None: no early stopping

    @property
    def first(self) -> ExperimentSpec:
        return next(iter(self.specs.values()))


def pack_loop_per_worker(config: dict[str, Any]) -> None:
    """One rank of a pack: build the pack engine, resume, then per epoch stop members (ASHA), checkpoint, report,
    and (rank 0) log each member's metrics to its own MLflow run."""
    import ray.train

    from .engine import pack_engine, pick_device

    job: PackJob = config["job"]
    first = job.first
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if first.run.gpus_per_worker > 0 else pick_device(first.run)
    teacher_file = resolve_teacher_file(first.teacher, job.tracking) if first.teacher else None
    init_file = resolve_init_file(first.init_from, job.tracking) if first.init_from else None
    engine = pack_engine(job.specs, teacher_file, device=device, rank=rank, world_size=world_size,
                         init_file=init_file)
    resumed_from = _restore(engine, Storage.open(first.run.resolved_storage, create=False), job.name, device)
    nodes = _worker_nodes(world_size)
    loggers: dict[str, MetricLogger] = {}
    monitors = []
    logged: dict[str, set[int]] = {}
    if rank == 0:
        for student in engine.students:
            run_id = job.run_ids[student.name]
            loggers[student.name], logged[student.name] = open_run_log(job.tracking, run_id, student.history, nodes,
                                                                       resumed_from, engine.epoch)
            student.on_step = loggers[student.name].log
            monitors.append(_system_metrics(TrainJob(job.specs[student.name], job.tracking, run_id, job.name)))
    try:
        _pack_epochs(job, engine, rank, world_size, loggers, logged)
    finally:
        for monitor in monitors:
            if monitor is not None:
                monitor.finish()
        for metric_log in loggers.values():
            metric_log.close()


def _asha_stops(job: PackJob, engine, results: dict[str, dict[str, float]], rank: int,
                world_size: int) -> dict[str, str]:
    """Members ASHA stops after this epoch (decided by rank 0, the same on every rank)."""
    import torch.distributed as dist

    stops: list[Any] = [{}]
    epochs = job.first.optim.epochs
    if rank == 0 and job.rungs and engine.epoch < epochs:
        import ray

        rungs = ray.get_actor(job.rungs)
        for name, metrics in results.items():
            value = metrics.get(job.metric)
            if value is not None and not ray.get(rungs.keep.remote(engine.epoch, value)):
                stops[0][name] = f"ASHA at epoch {engine.epoch} of {epochs} ({job.metric} {value:.4f})"
    if world_size > 1 and dist.is_initialized():
        dist.broadcast_object_list(stops, src=0)
    return stops[0]


def _pack_epochs(job: PackJob, engine, rank: int, world_size: int, loggers: dict[str, MetricLogger],
                 logged: dict[str, set[int]]) -> None:
    import ray.train

    from .run_artifacts import write_checkpoint_extras

    run, epochs = job.first.run, job.first.optim.epochs
    announced: set[str] = set()
    for results in engine.run_pack(epochs):
        stops = _asha_stops(job, engine, results, rank, world_size)
        for name, reason in stops.items():
            engine.stop(name, reason)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0 and (engine.epoch == epochs or engine.epoch % run.checkpoint_every == 0 or stops
                              or not engine.active()):
                extra: tuple[str, ...] = ()
                for student in engine.students:
                    folder = Path(tmp) / MEMBERS_DIR / student.name
                    folder.mkdir(parents=True)
                    extra += tuple(f"{MEMBERS_DIR}/{student.name}/{f}"
                                   for f in write_checkpoint_extras(folder, student.history, student.confusion))
                write_checkpoint(tmp, engine.state_dict(), extra_files=extra)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            values = [m[job.metric] for m in results.values() if job.metric in m]
            report = {"epoch": engine.epoch, "members": len(engine.active())}
            if values:
                report[job.metric] = max(values) if run.checkpoint_order == "max" else min(values)
            ray.train.report(report, checkpoint=checkpoint)
        if rank != 0:
            continue
        for name, metrics in results.items():
            if engine.epoch not in logged[name]:
                loggers[name].log(metrics, step=engine.epoch)
                logged[name].add(engine.epoch)
        for student in engine.students:
            if student.stopped and student.name not in announced:
                announced.add(student.name)
                # by its reason, not by this epoch's stops: a pack resumed after a crash re-announces old stops
                tag = DIVERGED_TAG if student.stopped.startswith(DIVERGED_REASON) else STOPPED_TAG
                job.tracking.try_set_tags(job.run_ids[student.name], {tag: student.stopped})


# ------------------------------------------------------------------------------------------------ the driver side
def pack_trial(config: dict[str, Any], sweep_name: str, specs: dict[str, ExperimentSpec], units: dict[str, list[str]],
               tracking: Tracking, parent_id: str, teachers: dict[str, dict[str, Any]], metric: str,
               rungs: str | None) -> None:
    """A Tune trial that trains one pack: opens (or reopens) each member's MLflow child run, fits one TorchTrainer,
    then records each member's results and closes its run FINISHED, KILLED (stopped by ASHA) or FAILED (diverged)."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from .sweep import _is_done, _runs_by_trial

    unit = config["trial"]
    by_name = _runs_by_trial(tracking, parent_id)
    run_ids: dict[str, str] = {}
    for name in units[unit]:
        runs = by_name.get(name, [])
        if any(_is_done(r) for r in runs):  # ended before the driver died: never trained again
            continue
        unfinished = next((r for r in runs if r.info.status in ("RUNNING", "KILLED")), None)
        if unfinished is not None:
            tracking.reopen_run(unfinished.info.run_id)
            run_ids[name] = unfinished.info.run_id
            continue
        spec = specs[name]
        tags = {**common_tags(spec.run), SWEEP_TAG: sweep_name, KIND_TAG: "trial",
                "deitlab.trial_id": tune.get_context().get_trial_id(),
                "deitlab.teacher_role": "distillation" if spec.distillation.spec_mode.needs_teacher else "reference",
                PACK_TAG: unit, PACK_SIZE_TAG: len(units[unit]), **run_tags(spec, teachers)}
        run_ids[name] = tracking.start_run(name, params=spec.flat_params(), tags=tags, parent_id=parent_id)
        tracking.log_json(run_ids[name], "spec.json", spec.model_dump(mode="json", by_alias=True))
    if not run_ids:
        tune.report({"epoch": 0})
        return
    job = PackJob({n: specs[n] for n in run_ids}, tracking, run_ids, f"{unit}-{parent_id[:8]}", metric, rungs)
    run = job.first.run
    storage = Storage.open(run.resolved_storage)
    trainer = TorchTrainer(
        pack_loop_per_worker, train_loop_config={"job": job}, scaling_config=scaling_config(run),
        run_config=RunConfig(name=job.name, storage_path=storage.root, storage_filesystem=storage.filesystem,
                             callbacks=[TuneReportCallback()],
                             failure_config=FailureConfig(max_failures=run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints,
                                                                checkpoint_score_attribute=metric,
                                                                checkpoint_score_order=run.checkpoint_order)))
    try:
        result = trainer.fit()
        _close_members(job, result, storage)
    except KeyboardInterrupt:
        for run_id in run_ids.values():
            tracking.end_if_running(run_id, "KILLED")
        raise
    except BaseException:
        for run_id in run_ids.values():
            tracking.end_if_running(run_id, "FAILED")
        raise


def _close_members(job: PackJob, result, storage: Storage) -> None:
    """Each member: fill epochs MLflow lacks, log its figures and best model, and close its run with its outcome."""
    from .ray_train import _log_run_files
    from .run_artifacts import HISTORY_FILE

    tracking = job.tracking
    last = result.checkpoint
    for name, run_id in job.run_ids.items():
        member_dir = f"{last.path}/{MEMBERS_DIR}/{name}" if last else None
        history = (_read_json(storage, member_dir, HISTORY_FILE) or []) if member_dir else []
        fill_from_history(tracking, run_id, history, name)
        tags = tracking.client.get_run(run_id).data.tags
        if member_dir:
            try:
                member = TrainJob(job.specs[name], tracking, run_id, job.name)
                view = _MemberResult(member_dir, _member_best(job, name, result, history))
                _log_run_files(member, view, storage, history, best_model=_member_state_loader(storage, name))
            except Exception as err:  # the member trained and its metrics are in MLflow: a missing figure is a warning
                log.warning("%s: evaluation artifacts not recorded (%s)", name, one_line(err, 200))
        status = "FAILED" if DIVERGED_TAG in tags else "KILLED" if STOPPED_TAG in tags else "FINISHED"
        tracking.end_run(run_id, status)


@dataclass(frozen=True)
class _Checkpoint:
    path: str


class _MemberResult:
    """A member's view of the pack's Ray Result: its folder of the last checkpoint, its best kept checkpoint."""

    def __init__(self, member_dir: str, best: list):
        self.checkpoint = _Checkpoint(member_dir)
        self.best_checkpoints = best


def _member_best(job: PackJob, name: str, result, history: list[dict[str, float]]) -> list:
    """The pack's kept checkpoints, each with this member's metrics at that checkpoint's epoch."""
    by_epoch = {int(m["epoch"]): m for m in history}
    kept = []
    for checkpoint, metrics in result.best_checkpoints or []:
        mine = by_epoch.get(int(metrics.get("epoch", -1)))
        if mine is not None:
            kept.append((checkpoint, mine))
    return kept


def _member_state_loader(storage: Storage, name: str):
    """Loads one member's state from a pack checkpoint (the pack's state.pt holds every member)."""
    def load(path: str) -> dict[str, Any]:
        state = storage.load(path)
        return state["students"][name] if "students" in state else state  # a pack of one saves a plain state
    return load
