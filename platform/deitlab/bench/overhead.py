"""Benchmarks (never timed tests): what the platform costs around the framework-free loop.

`overhead`: the same spec, device and data, trained by the bare Engine in this process and by one Ray Train worker
(checkpoint + report every `run.checkpoint_every` epochs). Steady-state epochs are compared by their wall time from
one epoch's end to the next, which includes evaluation and, on the Ray path, checkpointing and reporting; the
fixed start-up cost (Ray Train's controller and worker group) is reported separately.
"""
from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass

from deitlab.core.checkpoints import read_checkpoint
from deitlab.orchestration.teachers import resolve_teacher_file
from deitlab.spec.schema import ExperimentSpec
from deitlab.tracking.logger import finite_metrics
from deitlab.tracking.store import Tracking


@dataclass(frozen=True)
class OverheadResult:
    device: str
    epochs: int
    repeats: int
    bare_epoch_s: float  # median steady-state epoch (first epoch excluded: warm-up)
    ray_epoch_s: float
    bare_total_s: float  # engine construction + all epochs (median over repeats)
    ray_total_s: float  # TorchTrainer.fit, start-up included (median over repeats)

    @property
    def epoch_overhead(self) -> float:
        return self.ray_epoch_s / self.bare_epoch_s - 1

    def to_json(self) -> dict:
        return {**asdict(self), "epoch_overhead": self.epoch_overhead}


def _steady(histories: list[list[dict]]) -> float:
    """Median epoch wall time over every run, each run's first epoch (warm-up) excluded."""
    return statistics.median(m["epoch_wall_s"] for history in histories for m in (history[1:] or history))


def measure_overhead(spec: ExperimentSpec, repeats: int = 2) -> OverheadResult:
    """Alternate bare and Ray runs `repeats` times each, so drifting machine load falls on both paths alike."""
    from deitlab.core.engine import pick_device

    spec = spec.with_overrides({"run.workers": 1})  # one process against one process
    device = pick_device(spec.run)
    bare, ray, bare_totals, ray_totals = [], [], [], []
    for _ in range(repeats):
        history, seconds = _bare_run(spec, device)
        bare.append(history)
        bare_totals.append(seconds)
        history, seconds = _ray_run(spec)
        ray.append(history)
        ray_totals.append(seconds)
    return OverheadResult(device=_device_name(device), epochs=spec.optim.epochs, repeats=repeats,
                          bare_epoch_s=_steady(bare), ray_epoch_s=_steady(ray),
                          bare_total_s=statistics.median(bare_totals), ray_total_s=statistics.median(ray_totals))


def _teacher_file(spec: ExperimentSpec) -> str | None:
    return resolve_teacher_file(spec.teacher, Tracking.for_run(spec.run)) if spec.teacher else None


def _bare_run(spec: ExperimentSpec, device) -> tuple[list[dict], float]:
    from deitlab.core.engine import experiment_engine

    start = time.perf_counter()
    engine = experiment_engine(spec, _teacher_file(spec), device=device)
    history = list(engine.run(spec.optim.epochs))
    return history, time.perf_counter() - start


def _ray_run(spec: ExperimentSpec) -> tuple[list[dict], float]:
    from deitlab.orchestration.train import TrainUnit, fit

    with tempfile.TemporaryDirectory(prefix="deitlab-bench-") as storage:
        spec = spec.with_overrides({"run.storage": storage})
        start = time.perf_counter()
        result = fit(TrainUnit.single(spec, Tracking.for_run(spec.run), None, f"bench-{uuid.uuid4().hex[:8]}"))
        seconds = time.perf_counter() - start
        with result.checkpoint.as_directory() as directory:
            return read_checkpoint(directory)["history"], seconds


def _device_name(device) -> str:
    import os
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------------------- logging cost
@dataclass(frozen=True)
class LoggingResult:
    device: str
    tracking: str  # "sqlite (local file)" or the server's URI
    every: int  # steps between logged step metrics
    steps: int  # optimiser steps per run (all epochs)
    repeats: int
    plain_step_ms: float  # median steady-state step time without logging (epoch wall / steps)
    logged_step_ms: float  # the same with the MetricLogger attached
    log_call_us: float  # mean time of one MetricLogger.log() call on the training thread
    delivered: int  # metric values the store holds afterwards (must equal logged)
    logged: int

    @property
    def overhead(self) -> float:
        """Relative slowdown of a step: what the training thread pays, the sending thread's CPU share included."""
        return self.logged_step_ms / self.plain_step_ms - 1

    @property
    def call_share(self) -> float:
        """log() time on the training thread per step, as a share of the step (the part logging always costs)."""
        return self.log_call_us / 1000 / self.every / self.plain_step_ms

    def to_json(self) -> dict:
        return {**asdict(self), "overhead": self.overhead, "call_share": self.call_share}


def measure_logging(spec: ExperimentSpec, tracking_uri: str | None = None, every: int = 1,
                    repeats: int = 3) -> LoggingResult:
    """The bare loop with and without rank 0's MetricLogger (step metrics every `every` steps + epoch metrics) sending
    to a real MLflow store; runs alternate so drifting load falls on both. Step time = steady epoch wall / steps."""
    from deitlab.core.engine import experiment_engine, pick_device

    spec = spec.with_overrides({"run.log_every_steps": every})
    device = pick_device(spec.run)
    with tempfile.TemporaryDirectory(prefix="deitlab-bench-") as tmp:
        uri = tracking_uri or f"sqlite:///{tmp}/mlflow.db"
        tracking = Tracking(uri, "deitlab-bench-logging", None if tracking_uri else f"file://{tmp}/artifacts")
        tracking.experiment_id()
        plain, logged, call_seconds, calls, values, delivered, steps = [], [], 0.0, 0, 0, 0, 0
        for _ in range(repeats):
            engine = experiment_engine(spec, _teacher_file(spec), device=device)
            plain.append(list(engine.run(spec.optim.epochs)))

            run_id = tracking.start_run(f"bench-{uuid.uuid4().hex[:8]}")
            logger = tracking.metric_logger(run_id, spill_dir=tmp)
            engine = experiment_engine(spec, _teacher_file(spec), device=device)
            counts = {"calls": 0, "seconds": 0.0, "values": 0}

            def timed(metrics: dict, step: int) -> None:
                start = time.perf_counter()
                logger.log(metrics, step)
                counts["seconds"] += time.perf_counter() - start
                counts["calls"] += 1
                counts["values"] += len(finite_metrics(metrics))

            engine.on_step = timed
            history = []
            for metrics in engine.run(spec.optim.epochs):
                timed(metrics, int(metrics["epoch"]))
                history.append(metrics)
            logged.append(history)
            logger.close(timeout=120)
            tracking.end_run(run_id)
            run = tracking.run(run_id)
            delivered += sum(len(tracking.metric_history(run_id, key)) for key in run.metrics)
            values += counts["values"]
            call_seconds += counts["seconds"]
            calls += counts["calls"]
            steps = len(engine.train_loader) * spec.optim.epochs
    per_epoch = steps / spec.optim.epochs
    return LoggingResult(device=_device_name(device), tracking="sqlite (local file)" if tracking_uri is None else uri,
                         every=every, steps=steps, repeats=repeats,
                         plain_step_ms=1000 * _steady(plain) / per_epoch, logged_step_ms=1000 * _steady(logged) / per_epoch,
                         log_call_us=1e6 * call_seconds / max(calls, 1), delivered=delivered, logged=values)
