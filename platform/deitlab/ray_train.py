"""Ray Train adapter: a TorchTrainer whose workers drive the framework-free Engine.

Each worker builds its Engine (DDP across workers), resumes from Ray's checkpoint when one exists, and per epoch
reports metrics with a checkpoint (Ray only keeps metrics that come with a checkpoint). Rank 0 alone writes to MLflow.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spec import ExperimentSpec, RunSpec, TeacherSpec, TeacherTrainingSpec
from .tracking import Tracking

log = logging.getLogger("deitlab.train")

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, as one typed object: the spec, where to track, and the MLflow run to log to."""

    spec: ExperimentSpec | TeacherTrainingSpec
    tracking: Tracking
    run_id: str | None = None

    @property
    def is_teacher(self) -> bool:
        return isinstance(self.spec, TeacherTrainingSpec)


# --------------------------------------------------------------------------------------------------- Ray start
def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS / `address`, or start a local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Train's controller polls its workers every 2 s by default; short trials spend seconds just waiting on that.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Tune looks for per-trial result files that Train V2 trials do not write; MLflow holds the metrics.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # A local Ray is never preempted (spot reclaim); its watcher would be one more process per trial.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # One logical CPU more than the cores: room for the sweep trials' 0.01-CPU controller slivers, so N cores
        # still run N one-CPU workers at once.
        ray.init(num_cpus=num_cpus or (os.cpu_count() or 1) + 1, include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level=logging.WARNING)


# --------------------------------------------------------------------------------------------------- teachers
def resolve_teacher_file(teacher: TeacherSpec, tracking: Tracking) -> str:
    """A local model file for the teacher: its checkpoint, or its MLflow URI downloaded once per node."""
    if teacher.checkpoint is not None:
        return teacher.checkpoint
    # Key the cache on the artifact location, not the URI: models:/NAME/latest moves when a new version is registered.
    source = tracking.model_source(teacher.uri) if teacher.uri.startswith("models:/") else teacher.uri
    key = hashlib.sha256(f"{tracking.tracking_uri}|{source}".encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "deitlab-teachers" / key
    if not cache.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache.parent if cache.parent.exists() else None))
        tracking.download(source, staging)
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(cache)  # atomic: concurrent workers on one node race harmlessly
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return str(cache)


# --------------------------------------------------------------------------------------------------- worker loop
def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch

    from .engine import experiment_engine, pick_device, teacher_engine
    from .models import save_model

    job: TrainJob = config["job"]
    spec = job.spec
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if spec.run.gpus_per_worker > 0 else pick_device(spec.run)
    if job.is_teacher:
        engine = teacher_engine(spec, device=device, rank=rank, world_size=world_size)
    else:
        teacher_file = resolve_teacher_file(spec.teacher, job.tracking) if spec.teacher else None
        engine = experiment_engine(spec, teacher_file, device=device, rank=rank, world_size=world_size)

    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as directory:
            engine.load_state_dict(torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True))

    epochs, every = spec.optim.epochs, spec.run.checkpoint_every
    best = 0.0
    for metrics in engine.run(epochs):
        best = max(best, metrics["acc"])
        metrics["best_acc"] = best
        last = engine.epoch == epochs
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0 and (last or engine.epoch % every == 0):
                torch.save(engine.state_dict(), Path(tmp) / STATE_FILE)
                if last and job.is_teacher:
                    bundle = engine.bundle
                    save_model(Path(tmp) / MODEL_FILE, engine.model, arch=spec.arch, model_kwargs=spec.model_kwargs,
                               num_classes=bundle.num_classes, in_chans=bundle.in_chans,
                               metadata={"accuracy": metrics["acc"], "img_size": bundle.img_size,
                                         "mean": bundle.mean, "std": bundle.std})
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            if rank == 0 and job.run_id:
                job.tracking.log_metrics(job.run_id, metrics, step=engine.epoch)
            ray.train.report(metrics, checkpoint=checkpoint)


# --------------------------------------------------------------------------------------------------- driver side
def scaling_config(run: RunSpec):
    from ray.train import ScalingConfig

    resources = {"CPU": run.cpus_per_worker}
    if run.gpus_per_worker > 0:
        resources["GPU"] = run.gpus_per_worker
    return ScalingConfig(num_workers=run.workers, use_gpu=run.gpus_per_worker > 0, resources_per_worker=resources)


def fit(job: TrainJob, name: str, callbacks: list | None = None):
    """Run one TorchTrainer to completion; returns Ray's Result (checkpoint = the last epoch's)."""
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    run = job.spec.run
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=scaling_config(run),
        run_config=RunConfig(name=name, storage_path=run.resolved_storage, callbacks=callbacks or [],
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    return trainer.fit()


# --------------------------------------------------------------------------------------------------- workflows
@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    metrics: dict[str, Any]
    model_uri: str | None = None  # teachers: the registered version


def preflight_teachers(teachers: list[TeacherSpec], data, tracking: Tracking) -> None:
    """Resolve and load every teacher once in the driver, so a bad checkpoint or URI fails before Ray starts work."""
    from .data import load_data
    from .models import load_teacher

    if not teachers:
        return
    bundle = load_data(data)
    for teacher in teachers:
        load_teacher(resolve_teacher_file(teacher, tracking), num_classes=bundle.num_classes,
                     in_chans=bundle.in_chans, arch=teacher.arch, model_kwargs=teacher.model_kwargs)


def tracked_fit(job_spec, tracking: Tracking, run_name: str, tags: dict[str, str], callbacks=None,
                 parent_id: str | None = None, on_success=None) -> TrainOutcome:
    """Open an MLflow run, fit, close the run FINISHED or FAILED (never left RUNNING)."""
    run_id = tracking.start_run(run_name, params=job_spec.flat_params(), tags=tags, parent_id=parent_id)
    try:
        result = fit(TrainJob(job_spec, tracking, run_id), name=f"{run_name}-{run_id[:8]}", callbacks=callbacks)
        extra = on_success(run_id, result) if on_success else None
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id, "FINISHED")
    return TrainOutcome(run_id, dict(result.metrics or {}), extra)


def train_experiment(spec: ExperimentSpec) -> TrainOutcome:
    from .tracking import KIND_TAG

    tracking = Tracking.for_run(spec.run)
    tracking.experiment_id()
    preflight_teachers([spec.teacher] if spec.teacher else [], spec.data, tracking)
    return tracked_fit(spec, tracking, spec.name, {KIND_TAG: "train"})


def train_teacher(spec: TeacherTrainingSpec, callbacks: list | None = None) -> TrainOutcome:
    """Train a classifier with Ray Train, log its model file, and register it as a new version of `spec.name`."""
    from .tracking import KIND_TAG, TEACHER_ACC_TAG

    tracking = Tracking.for_run(spec.run)
    tracking.experiment_id()

    def register(run_id: str, result) -> str:
        with result.checkpoint.as_directory() as directory:
            tracking.log_artifact(run_id, Path(directory) / MODEL_FILE, "teacher")
        uri = tracking.register_teacher(run_id, "teacher", spec.name, result.metrics["acc"])
        tracking.set_tags(run_id, {"deitlab.model_uri": uri, TEACHER_ACC_TAG: result.metrics["acc"]})
        return uri

    return tracked_fit(spec, tracking, f"teacher-{spec.name}", {KIND_TAG: "teacher", "deitlab.teacher": spec.name},
                        callbacks=callbacks, on_success=register)
