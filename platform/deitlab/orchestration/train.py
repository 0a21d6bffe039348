"""The Ray Train adapter: a TorchTrainer whose workers drive the framework-free Engine, for one run or a pack.

A `TrainUnit` is what one TorchTrainer trains: one MLflow run (`deitlab train`, a teacher, a sweep trial) or a pack
of trials that share every batch and teacher forward — a single run is a pack of one, with one worker loop, one
trainer builder and one driver (`run_unit`) that records each member and ends its MLflow run FINISHED, KILLED or
FAILED with its reason. Each worker builds its Engine (DDP across workers), resumes from the newest checkpoint in
storage, and per epoch reports metrics with a checkpoint (Ray only keeps metrics that come with a checkpoint). Rank 0
alone writes the runs' metrics to MLflow; each node's first rank adds that node's system metrics.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deitlab.core.checkpoints import Storage, write_checkpoint
from deitlab.core.models import save_model, write_model_file
from deitlab.core.run_artifacts import (
    CONFUSION_FILE,
    HISTORY_FILE,
    confusion_json,
    confusion_png,
    curves_png,
    write_checkpoint_extras,
)
from deitlab.core.step import DIVERGED_REASON
from deitlab.data.loaders import load_data
from deitlab.errors import TrainingDiverged, one_line
from deitlab.orchestration.cluster import scaling_config
from deitlab.orchestration.lineage import (
    BEST_MODEL,
    TEACHER_MODEL_PARAMS,
    log_model_file,
    record_datasets,
)
from deitlab.orchestration.preflight import Checked, preflight
from deitlab.orchestration.records import ray_run_name
from deitlab.orchestration.teachers import resolve_init_file, resolve_teacher_file, teacher_card
from deitlab.spec.schema import ExperimentSpec, RunSpec, TeacherTrainingSpec
from deitlab.tracking.logger import MetricLogger
from deitlab.tracking.names import (
    BEST_EPOCH_TAG,
    BEST_MODEL_URI_TAG,
    DIVERGED_TAG,
    GIT_COMMIT_TAG,
    KIND_TAG,
    LAST_FAILURE_TAG,
    MODE_TAG,
    MODEL_URI_TAG,
    REFERENCE_TEACHER_TAG,
    RESUMED_FROM_TAG,
    RESUMES_TAG,
    STOPPED_TAG,
    STUDENT_TAG,
    TEACHER_ACC_TAG,
    TEACHER_ARCH_TAG,
    TEACHER_CACHE_CHECKS_TAG,
    TEACHER_CACHE_KEY_TAG,
    TEACHER_CACHE_TAG,
    TEACHER_FAMILY_TAG,
    TEACHER_FORWARDS_TAG,
    TEACHER_GFLOPS_TAG,
    TEACHER_SHA_TAG,
    TEACHER_TAG,
    TOKEN_TAG,
    WORKER_FAILURES_TAG,
    WORKER_NODES_TAG,
    best_metric_tag,
)
from deitlab.tracking.store import Tracking, git_commit

log = logging.getLogger("deitlab.train")


MODEL_FILE = "model.pt"


MEMBERS_DIR = "members"  # a pack's checkpoint: state.pt (every member) + members/<name>/{history,confusion}.json


@dataclass(frozen=True)
class UnitMember:
    """One MLflow run of a unit: the trial's (the run's) name, its spec, its run id (None: not tracked, the bench)."""

    name: str
    spec: ExperimentSpec | TeacherTrainingSpec
    run_id: str | None = None


@dataclass(frozen=True)
class TrainUnit:
    """What one TorchTrainer trains, as one typed object for every worker: one run, or a pack of trials that share
    every batch and teacher forward (packs.py plans them). A single run is a pack of one.

    `metric` is what a pack reports to Tune and ranks checkpoints by (its best member's value); `rungs` names the
    sweep's ASHA actor for members of packs (Tune's ASHA would stop whole packs)."""

    members: tuple[UnitMember, ...]
    tracking: Tracking
    name: str  # Ray Train run name = the unit's directory in storage
    metric: str = "acc"
    rungs: str | None = None
    packed: bool = False  # a packed sweep's unit (even of one): members fail alone, checkpoints keep members/<name>/

    @classmethod
    def single(cls, spec, tracking: Tracking, run_id: str | None, run_name: str) -> TrainUnit:
        """A unit of one run; its storage directory is found again from the run id (ray_run_name)."""
        name = ray_run_name(run_name, run_id) if run_id else run_name
        return cls((UnitMember(run_name, spec, run_id),), tracking, name, spec.run.checkpoint_metric)

    @property
    def first(self) -> ExperimentSpec | TeacherTrainingSpec:
        return self.members[0].spec

    @property
    def is_teacher(self) -> bool:
        return isinstance(self.first, TeacherTrainingSpec)

    def extras_dir(self, name: str) -> str:
        """Where a member's history.json and confusion.json sit in a checkpoint: beside the state for a single run,
        members/<name>/ in a pack's."""
        return f"{MEMBERS_DIR}/{name}" if self.packed else ""


# --------------------------------------------------------------------------------------------------- worker loop
def _restore(engine, storage: Storage, run_name: str, device) -> str | None:
    """Load the newest complete checkpoint of this run into the engine; returns where it came from.

    Read from storage rather than `ray.train.get_checkpoint()`: a worker killed right after its checkpoint reached
    storage, before the controller registered it, would otherwise make the restarted workers redo that epoch.
    Rank 0 picks (skipping damaged checkpoints with a warning) and tells the other ranks, so all load the same one.
    """
    import torch.distributed as dist

    state, chosen = None, [None]
    if engine.rank == 0:
        found = storage.latest_valid(run_name, map_location=device)
        if found is not None:
            state, chosen[0] = found
    if engine.world_size > 1 and dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        return None
    engine.load_state_dict(state if state is not None else storage.load(chosen[0], map_location=device))
    return storage.display(chosen[0])


def _worker_nodes(world_size: int) -> list[str]:
    """Each rank's Ray node (short id), gathered on every rank: where the run actually ran, for its MLflow record."""
    import ray
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()[:8]
    if world_size == 1 or not dist.is_initialized():
        return [mine]
    nodes: list[Any] = [None] * world_size
    dist.all_gather_object(nodes, mine)
    return nodes


@dataclass
class _RunLog:
    """Rank 0's record of one member's MLflow run: its metric logger and the epochs MLflow holds."""

    run_id: str
    metrics: MetricLogger
    logged: set[int]


def _never_wait_on_mlflow() -> None:
    # A worker never waits on MLflow: a call to an unreachable server gives up after ~10 s (MLflow's default is
    # several minutes of retries) and the metric logger keeps the values until the server is back.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _node_monitor(unit: TrainUnit, rank: int, nodes: list[str]):
    """One system-metrics sampler per node and unit, its samples logged to every member's run: the members share
    the machine. Each node's first rank samples its node; where the run spans several nodes the names carry the node
    (system/<node>/…, the short ids of deitlab.worker_nodes), else they stay system/…. `nodes`: every rank's Ray
    node (Ray Train's local rank groups workers by IP, and two Ray nodes may share one)."""
    run_ids = [m.run_id for m in unit.members if m.run_id]
    if rank >= len(nodes) or nodes.index(nodes[rank]) != rank or not run_ids:
        return None
    _never_wait_on_mlflow()
    return unit.tracking.system_metrics(run_ids, node_id=nodes[rank] if len(set(nodes)) > 1 else None)


def _finish_monitor(monitor) -> None:
    if monitor is None:
        return
    try:
        monitor.finish()
    except Exception as err:  # the run trained: a lost last sample is only a warning
        log.warning("the last system metrics were not recorded (%s)", one_line(err, 200))


def open_run_log(tracking: Tracking, run_id: str, history: list[dict[str, float]], nodes: list[str],
                 resumed_from: str | None, epoch: int) -> tuple[MetricLogger, set[int]]:
    """Rank 0 at a (re)start of a run: its metric logger, and the epochs MLflow holds. Tags the ranks' nodes and
    records a resume from a checkpoint.

    MLflow holds each epoch once: epochs it already has (logged before a failure) are not logged again, and epochs the
    checkpoint's `history` has but MLflow lacks (a failure between checkpoint and logging) are filled in. When MLflow
    cannot be asked, nothing is refilled here: the driver fills gaps at the end.
    """
    _never_wait_on_mlflow()
    metrics_log = tracking.metric_logger(run_id)
    tracking.try_set_tags(run_id, {WORKER_NODES_TAG: ",".join(nodes)})
    try:
        logged = tracking.logged_epochs(run_id, strict=True)
    except Exception:
        logged = {int(m["epoch"]) for m in history}
    for metrics in history:
        if int(metrics["epoch"]) not in logged:
            metrics_log.log(metrics, step=int(metrics["epoch"]))
            logged.add(int(metrics["epoch"]))
    if resumed_from:
        tracking.record_resume(run_id, resumed_from, epoch)
    return metrics_log, logged


def _unit_engine(unit: TrainUnit, device, rank: int, world_size: int):
    """The Engine of a unit: a classifier for a teacher training, else one student per member."""
    from deitlab.core.engine import pack_engine, teacher_engine

    first = unit.first
    if unit.is_teacher:
        return teacher_engine(first, device=device, rank=rank, world_size=world_size, name=unit.members[0].name)
    teacher_file = resolve_teacher_file(first.teacher, unit.tracking) if first.teacher else None
    init_file = resolve_init_file(first.init_from, unit.tracking) if first.init_from else None
    return pack_engine({m.name: m.spec for m in unit.members}, teacher_file, device=device, rank=rank,
                       world_size=world_size, init_file=init_file, cache_storage=first.run.cache_storage)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One rank of a unit: build the engine, resume, then per epoch stop members (ASHA, packs), checkpoint, report,
    and (rank 0) log each member's metrics to its own MLflow run, exactly once."""
    import ray.train

    from deitlab.core.engine import pick_device

    unit: TrainUnit = config["unit"]
    run = unit.first.run
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if run.gpus_per_worker > 0 else pick_device(run)
    engine = _unit_engine(unit, device, rank, world_size)
    resumed_from = _restore(engine, Storage.open(run.resolved_storage, create=False), unit.name, device)
    nodes = _worker_nodes(world_size)
    runs: dict[str, _RunLog] = {}
    monitor = None
    try:
        for student, member in zip(engine.students, unit.members):
            if rank != 0 or member.run_id is None:
                continue
            metrics_log, logged = open_run_log(unit.tracking, member.run_id, student.history, nodes, resumed_from,
                                               engine.epoch)
            student.on_step = metrics_log.log
            runs[student.name] = _RunLog(member.run_id, metrics_log, logged)
        if runs:
            record_datasets(unit.tracking, [r.run_id for r in runs.values()], unit.first.data, engine.bundle)
        monitor = _node_monitor(unit, rank, nodes)
        if runs and resumed_from:
            log.warning("%s: resumed from checkpoint %s (epoch %d)", unit.name, resumed_from, engine.epoch)
        _train_epochs(unit, engine, rank, world_size, runs)
    finally:
        _finish_monitor(monitor)
        for record in runs.values():
            record.metrics.close()


def _asha_stops(unit: TrainUnit, engine, results: dict[str, dict[str, float]], rank: int,
                world_size: int) -> dict[str, str]:
    """Members of a pack that ASHA's rule stops after this epoch (decided by rank 0, the same on every rank)."""
    import torch.distributed as dist

    stops: list[Any] = [{}]
    epochs = unit.first.optim.epochs
    if rank == 0 and unit.rungs and engine.epoch < epochs:
        import ray

        rungs = ray.get_actor(unit.rungs)
        for name, metrics in results.items():
            value = metrics.get(unit.metric)
            if value is not None and not ray.get(rungs.keep.remote(engine.epoch, value)):
                stops[0][name] = f"ASHA at epoch {engine.epoch} of {epochs} ({unit.metric} {value:.4f})"
    if unit.rungs and world_size > 1 and dist.is_initialized():
        dist.broadcast_object_list(stops, src=0)
    return stops[0]


def _write_unit_checkpoint(unit: TrainUnit, engine, results: dict[str, dict[str, float]], tmp: str):
    """The engine's state, each member's history and confusion matrix, and (a teacher's last epoch) its model file."""
    import ray.train

    extra: tuple[str, ...] = ()
    if unit.is_teacher and engine.epoch == unit.first.optim.epochs:
        spec, bundle = unit.first, engine.bundle
        save_model(Path(tmp) / MODEL_FILE, engine.model, arch=spec.arch, model_kwargs=spec.model_kwargs,
                   num_classes=bundle.num_classes, in_chans=bundle.in_chans,
                   metadata={"accuracy": results[unit.members[0].name]["acc"], "img_size": bundle.img_size,
                             "mean": bundle.mean, "std": bundle.std})
        extra = (MODEL_FILE,)
    for student in engine.students:
        where = unit.extras_dir(student.name)
        folder = Path(tmp, where)
        folder.mkdir(parents=True, exist_ok=True)
        extra += tuple(f"{where}/{f}" if where else f
                       for f in write_checkpoint_extras(folder, student.history, student.confusion))
    write_checkpoint(tmp, engine.state_dict(), extra_files=extra)
    return ray.train.Checkpoint.from_directory(tmp)


MEMBERS_KEY = "by_member"  # a pack's report: each member's epoch, metric and state, for the live table


def _reported(unit: TrainUnit, engine, results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """What Tune (its ASHA, the progress table) sees: a single run's metrics; a pack's best member value (what Tune
    ranks its checkpoints by) and, under MEMBERS_KEY, every member's last epoch, value of the metric and state
    (running; stopped: by ASHA's rule; failed: diverged)."""
    if not unit.packed:
        return results[unit.members[0].name]
    run = unit.first.run
    values = [m[unit.metric] for m in results.values() if unit.metric in m]
    report: dict[str, Any] = {"epoch": engine.epoch, "members": len(engine.active())}
    if values:
        report[unit.metric] = max(values) if run.checkpoint_order == "max" else min(values)
    by_member = {}
    for student in engine.students:
        last = student.history[-1] if student.history else {}
        state = "running" if not student.stopped else \
            "failed" if student.stopped.startswith(DIVERGED_REASON) else "stopped"
        by_member[student.name] = {"epoch": int(last["epoch"]) if last else None,
                                   unit.metric: last.get(unit.metric), "state": state}
    report[MEMBERS_KEY] = by_member
    return report


def _train_epochs(unit: TrainUnit, engine, rank: int, world_size: int, runs: dict[str, _RunLog]) -> None:
    """Per epoch: ASHA's stops (packs), report (rank 0 adds a checkpoint every N epochs, at the end and when a member
    stops), then rank 0 logs each member's epoch once and records why a member stopped."""
    import ray.train

    run, epochs = unit.first.run, unit.first.optim.epochs
    announced: set[str] = set()
    for results in engine.run_pack(epochs):
        stops = _asha_stops(unit, engine, results, rank, world_size)
        for name, reason in stops.items():
            engine.stop(name, reason)
        if results:  # empty when every member still training diverged this epoch
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0 and (engine.epoch == epochs or engine.epoch % run.checkpoint_every == 0 or stops
                                  or not engine.active()):
                    checkpoint = _write_unit_checkpoint(unit, engine, results, tmp)
                ray.train.report(_reported(unit, engine, results), checkpoint=checkpoint)
        for name, metrics in results.items():
            record = runs.get(name)
            if record is not None and engine.epoch not in record.logged:
                record.metrics.log(metrics, step=engine.epoch)
                record.logged.add(engine.epoch)
        for student in engine.students:
            if not student.stopped or student.name in announced:
                continue
            announced.add(student.name)
            # by its reason, not by this epoch's stops: a pack resumed after a crash re-announces old stops
            diverged = student.stopped.startswith(DIVERGED_REASON)
            if diverged and not unit.packed and unit.members[0].run_id is None:
                raise FloatingPointError(student.stopped)  # untracked (the bench): nobody else would say it
            record = runs.get(student.name)
            if record is not None:
                if diverged:
                    log.warning("%s: %s", student.name, student.stopped)
                unit.tracking.try_set_tags(record.run_id, {DIVERGED_TAG if diverged else STOPPED_TAG: student.stopped})
    _record_teacher_batches(unit, engine, runs)


def _record_teacher_batches(unit: TrainUnit, engine, runs: dict[str, _RunLog]) -> None:
    """Rank 0, at the end: on each member's run, how its teacher batches were served (the cache, written, live)."""
    if engine.teacher is None:
        return
    stats = engine.teacher_stats
    tags = {TEACHER_CACHE_TAG: stats.summary() if engine.teacher_cache is not None else "off",
            TEACHER_FORWARDS_TAG: stats.live, TEACHER_CACHE_CHECKS_TAG: stats.checked}
    if engine.teacher_cache is not None:
        tags[TEACHER_CACHE_KEY_TAG] = engine.teacher_cache.key.key
    for record in runs.values():
        unit.tracking.try_set_tags(record.run_id, tags)


def _failure_recorder(unit: TrainUnit):
    """A Train callback (it runs in the Train controller) that records worker failures on the unit's MLflow runs."""
    from ray.train import UserCallback

    run_ids = [m.run_id for m in unit.members if m.run_id]

    class FailureRecorder(UserCallback):
        def __init__(self):
            self.failures = 0

        def after_exception(self, run_context, worker_exceptions):
            self.failures += 1
            rank, error = next(iter(sorted(worker_exceptions.items())))
            text = one_line(error, 250)
            for run_id in run_ids:
                unit.tracking.try_set_tags(run_id, {WORKER_FAILURES_TAG: self.failures,
                                                    LAST_FAILURE_TAG: f"rank {rank}: {text}"})

    return FailureRecorder()


def fit(unit: TrainUnit, callbacks: list | None = None):
    """Run one TorchTrainer to completion; returns Ray's Result (checkpoint = the last epoch's).

    Worker failures restart the worker group from the latest checkpoint up to run.max_failures times. A unit
    started again under the same name and storage (`--resume`, a resumed sweep) continues from its latest checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    run = unit.first.run
    storage = Storage.open(run.resolved_storage)
    if any(m.run_id for m in unit.members):
        callbacks = [*(callbacks or []), _failure_recorder(unit)]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"unit": unit},
        scaling_config=scaling_config(run),
        run_config=RunConfig(
            name=unit.name, storage_path=storage.root, storage_filesystem=storage.filesystem,
            callbacks=callbacks or [], failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints,
                                               checkpoint_score_attribute=unit.metric,
                                               checkpoint_score_order=run.checkpoint_order)),
    )
    return trainer.fit()


# --------------------------------------------------------------------------------------------------- workflows
@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    metrics: dict[str, Any]
    model_uri: str | None = None  # teachers: the registered version


def run_tags(spec: ExperimentSpec, teachers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The tags an experiment's MLflow run is found and grouped by in the UI: mode, student, teacher and its family.
    A run without distillation has teacher "none" (grouping by teacher keeps the baseline apart); the teacher its
    agreement is measured against is its reference teacher."""
    distilled = spec.distillation.spec_mode.needs_teacher
    label = spec.teacher.label if spec.teacher else "none"
    info = teachers.get(label, {}) if distilled else {}
    tags = {MODE_TAG: spec.distillation.mode, STUDENT_TAG: spec.student.arch,
            TOKEN_TAG: spec.distillation.uses_token, TEACHER_TAG: label if distilled else "none",
            TEACHER_FAMILY_TAG: info.get("family", "none")}
    if not distilled and spec.teacher:
        tags[REFERENCE_TEACHER_TAG] = label
    if info:
        tags.update({TEACHER_ARCH_TAG: info["arch"], TEACHER_GFLOPS_TAG: info["gflops"]})
        if info.get("sha256"):
            tags[TEACHER_SHA_TAG] = info["sha256"]
    return tags


TEACHER_NUMBERS = {"gflops": "teacher.gflops", "params_m": "teacher.params_m", "accuracy": "teacher.accuracy"}


def teacher_params(spec: ExperimentSpec, teachers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The distilling teacher's size and accuracy as params (teacher.gflops, .params_m, .accuracy), numbers the
    MLflow chart view can put on an axis against the student's accuracy. None for runs without distillation."""
    if not (spec.teacher and spec.distillation.spec_mode.needs_teacher):
        return {}
    info = teachers.get(spec.teacher.label, {})
    return {param: info[fact] for fact, param in TEACHER_NUMBERS.items() if info.get(fact) is not None}


def common_tags(run: RunSpec) -> dict[str, Any]:
    """Tags of every run, sweep parents included: the deitlab commit that ran it and the user's own run.tags."""
    commit = git_commit()
    return {**({GIT_COMMIT_TAG: commit} if commit else {}), **run.tags}


# --------------------------------------------------------------------------------------------------- driver: runs
def open_run(tracking: Tracking, spec, name: str, tags: dict[str, Any], parent_id: str | None = None,
             resume_run_id: str | None = None, params: dict[str, Any] | None = None) -> str:
    """A new MLflow run for `spec` (its flat params and `params`, the common and given tags, spec.json), or the
    unfinished one being resumed, reopened."""
    if resume_run_id:
        tracking.reopen_run(resume_run_id)
        return resume_run_id
    run_id = tracking.start_run(name, params={**spec.flat_params(), **(params or {})},
                                tags={**common_tags(spec.run), **tags}, parent_id=parent_id)
    tracking.log_json(run_id, "spec.json", spec.model_dump(mode="json", by_alias=True))
    return run_id


def run_unit(unit: TrainUnit, callbacks: list | None = None, on_success=None) -> Any:
    """Fit the unit, record each member's results, and close each member's MLflow run FINISHED, KILLED (stopped by
    ASHA, interrupted) or FAILED (diverged, the fit failed) — never left RUNNING. Returns Ray's Result.

    A single run whose loss diverged raises TrainingDiverged (`deitlab train` fails with it; a sweep's trial errs);
    a pack's diverged member fails alone and the rest of its pack is recorded. `on_success(run_id, result)` runs for
    a member that finished (teachers register their model there)."""
    tracking = unit.tracking
    tracked = [m for m in unit.members if m.run_id]
    try:
        result = fit(unit, callbacks)
        storage = Storage.open(unit.first.run.resolved_storage, create=False)
        for member in tracked:
            tags = tracking.run(member.run_id).tags
            if DIVERGED_TAG in tags and not unit.packed:  # the workers stopped early (and were not restarted)
                raise TrainingDiverged(f"{member.name}: {tags[DIVERGED_TAG]} (MLflow run {member.run_id})")
            _record_member(unit, member, result, storage)
            status = "FAILED" if DIVERGED_TAG in tags else "KILLED" if STOPPED_TAG in tags else "FINISHED"
            if status == "FINISHED" and on_success is not None:
                on_success(member.run_id, result)
            tracking.end_run(member.run_id, status)
            if RESUMED_FROM_TAG in tags:
                log.warning("%s: resumed %s time(s), last from checkpoint %s", member.name,
                            tags.get(RESUMES_TAG, "1"), tags[RESUMED_FROM_TAG])
    except KeyboardInterrupt:
        for member in tracked:
            tracking.end_if_running(member.run_id, "KILLED")
        raise
    except BaseException:
        for member in tracked:
            tracking.end_if_running(member.run_id, "FAILED")
        raise
    return result


def _record_member(unit: TrainUnit, member: UnitMember, result, storage: Storage) -> None:
    """After a fit: fill in the member's epochs MLflow lacks, then log its curves, confusion matrix and best weights.

    Read from the checkpoints in storage (history.json, confusion.json, the best state.pt), not from the workers:
    this runs in the driver, which retries an unreachable tracking server for minutes.
    """
    if result.checkpoint is None:
        return
    where = unit.extras_dir(member.name)
    extras = f"{result.checkpoint.path}/{where}" if where else result.checkpoint.path
    history = _read_json(storage, extras, HISTORY_FILE) or []
    fill_from_history(unit.tracking, member.run_id, history, member.name)
    try:
        _log_run_files(unit, member, result, storage, history, extras)
    except Exception as err:  # the run trained and its metrics are in MLflow: a missing figure does not fail it
        log.warning("%s: evaluation artifacts not recorded (%s)", member.name, one_line(err, 200))


def _log_run_files(unit: TrainUnit, member: UnitMember, result, storage: Storage, history: list[dict[str, float]],
                   extras: str) -> None:
    """Curves, confusion matrix and (students) the best model as artifacts of the member's run."""
    import json


    tracking, run_id, spec = unit.tracking, member.run_id, member.spec
    title = spec.name if unit.is_teacher else member.name if unit.packed else unit.name
    with tempfile.TemporaryDirectory() as tmp:
        files = [curves_png(history, Path(tmp) / "curves.png", title)]
        confusion = _read_json(storage, extras, CONFUSION_FILE)
        if confusion:
            head = "cls" if unit.is_teacher else spec.distillation.eval_head
            (Path(tmp) / "confusion_matrix.json").write_text(json.dumps(confusion_json(confusion, head), indent=1))
            files += [Path(tmp) / "confusion_matrix.json",
                      confusion_png(confusion, Path(tmp) / "confusion_matrix.png", f"{title} ({head} head)")]
        for path in files:
            if path is not None:
                tracking.log_artifact(run_id, path, "evaluation")
        if not unit.is_teacher:
            _log_best_model(unit, member, result, storage, history, Path(tmp))


def _read_json(storage: Storage, checkpoint_path: str, name: str):
    """A small JSON file beside a checkpoint's state (history.json, confusion.json), or None."""
    import json

    try:
        with storage.filesystem.open_input_stream(f"{checkpoint_path}/{name}") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def fill_from_history(tracking: Tracking, run_id: str, history: list[dict[str, float]], name: str) -> None:
    filled = tracking.fill_missing_epochs(run_id, history)
    if filled:
        log.warning("%s: %d epoch(s) the workers could not deliver to MLflow were filled in from the checkpoint",
                    name, filled)


def fill_from_checkpoint(tracking: Tracking, run_id: str, storage_uri: str, run_name: str) -> None:
    """Fill the MLflow run's missing epochs from its newest checkpoint (a trial that was stopped from outside, whose
    rank 0 had no time to deliver its last values)."""
    try:
        storage = Storage.open(storage_uri, create=False)
        newest = storage.checkpoints(ray_run_name(run_name, run_id))
        history = _read_json(storage, newest[0], HISTORY_FILE) if newest else None
        if history:
            fill_from_history(tracking, run_id, history, run_name)
    except Exception as err:  # best effort: the run's own record stands
        log.warning("%s: could not compare MLflow with the checkpoint (%s)", run_name, one_line(err, 200))


def _log_best_model(unit: TrainUnit, member: UnitMember, result, storage: Storage, history: list[dict[str, float]],
                    tmp: Path) -> None:
    """The kept checkpoint in which this member is best by run.checkpoint_metric, as a deitlab model file:
    `best_model/model.pt`. A pack's kept checkpoints are ranked by its best member: each is looked up in this
    member's history at that checkpoint's epoch."""
    spec = member.spec
    metric, order = spec.run.checkpoint_metric, spec.run.checkpoint_order
    by_epoch = {int(m["epoch"]): m for m in history}
    kept = [(c, by_epoch[int(m.get("epoch", -1))]) for c, m in (result.best_checkpoints or [])
            if int(m.get("epoch", -1)) in by_epoch]
    kept = [(c, m) for c, m in kept if metric in m]
    if not kept:
        return
    checkpoint, metrics = (max if order == "max" else min)(kept, key=lambda cm: cm[1][metric])
    state = storage.load(checkpoint.path)
    state = state["students"][member.name] if "students" in state else state  # a pack's state holds every member
    bundle = load_data(spec.data)
    token, epoch = spec.distillation.uses_token, int(state["epoch"])
    arch = spec.student.timm_name(token)
    path = write_model_file(tmp / "best_model" / MODEL_FILE, state["model"], arch=arch,
                            model_kwargs=spec.student.timm_kwargs(bundle.img_size), num_classes=bundle.num_classes,
                            in_chans=bundle.in_chans,
                            metadata={"epoch": epoch, metric: metrics[metric], "run_id": member.run_id,
                                      "img_size": bundle.img_size, "mean": bundle.mean, "std": bundle.std})
    measured = {k: v for k, v in metrics.items() if k.startswith("acc") or k in ("agreement", "val_loss")}
    model = log_model_file(unit.tracking, member.run_id, path, BEST_MODEL, metrics=measured, step=epoch,
                           params={"arch": arch, "epoch": epoch, "checkpoint_metric": metric},
                           tags={KIND_TAG: "student", MODE_TAG: spec.distillation.mode,
                                 TEACHER_TAG: run_tags(spec, {})[TEACHER_TAG]}, data=spec.data, bundle=bundle)
    unit.tracking.set_tags(member.run_id, {BEST_EPOCH_TAG: epoch, best_metric_tag(metric): metrics[metric],
                                           BEST_MODEL_URI_TAG: model.uri})


def train_experiment(spec: ExperimentSpec, resume: bool = False, run_id: str | None = None,
                     checked: Checked | None = None) -> TrainOutcome:
    """Train one experiment as a new MLflow run, or (resume) continue an unfinished one from its last checkpoint.
    `checked`: the command's preflight (else it runs here, before anything is written)."""
    checked = checked or preflight([spec])
    tracking = Tracking.for_run(spec.run)
    tracking.experiment_id()
    storage = Storage.open(spec.run.resolved_storage)
    resume_id = None
    if resume:
        resume_id = tracking.resumable_run(spec.name, spec.flat_params(), run_id).id
        # Checked here too, so damaged checkpoints are reported where the user is looking; the workers repeat it.
        found = storage.latest_valid(ray_run_name(spec.name, resume_id))
        if found is None:
            log.warning("run %s has no complete checkpoint: it starts again from epoch 0", resume_id)
        else:
            log.warning("resuming run %s from checkpoint %s (epoch %d)", resume_id, storage.display(found[1]),
                        found[0]["epoch"])
    run_id = open_run(tracking, spec, spec.name, {KIND_TAG: "train", **run_tags(spec, checked.teachers)},
                      resume_run_id=resume_id, params=teacher_params(spec, checked.teachers))
    result = run_unit(TrainUnit.single(spec, tracking, run_id, spec.name))
    return TrainOutcome(run_id, dict(result.metrics or {}))


def train_teacher(spec: TeacherTrainingSpec, callbacks: list | None = None) -> TrainOutcome:
    """Train a classifier with Ray Train, log its model file, and register it as a new version of `spec.name`."""
    tracking = Tracking.for_run(spec.run)
    tracking.experiment_id()
    registered: list[str] = []

    def register(run_id: str, result) -> None:
        with result.checkpoint.as_directory() as directory:
            card, bundle = teacher_card(Path(directory) / MODEL_FILE, spec)
            metrics = {k: v for k, v in result.metrics.items() if k.startswith("acc") or k == "val_loss"}
            model = log_model_file(tracking, run_id, Path(directory) / MODEL_FILE, spec.name, metrics=metrics,
                                   step=int(result.metrics.get("epoch", spec.optim.epochs)),
                                   params={k: card[k] for k in TEACHER_MODEL_PARAMS}, tags={KIND_TAG: "teacher"},
                                   data=spec.data, bundle=bundle)
        uri = tracking.register_teacher(run_id, model, spec.name, result.metrics["acc"], tags=card, alias=spec.alias)
        tracking.set_tags(run_id, {MODEL_URI_TAG: uri, TEACHER_ACC_TAG: result.metrics["acc"],
                                   TEACHER_FAMILY_TAG: card["family"]})
        registered.append(uri)

    name = f"teacher-{spec.name}"
    run_id = open_run(tracking, spec, name, {KIND_TAG: "teacher", TEACHER_TAG: spec.name})
    result = run_unit(TrainUnit.single(spec, tracking, run_id, name), callbacks=callbacks, on_success=register)
    return TrainOutcome(run_id, dict(result.metrics or {}), registered[0] if registered else None)
