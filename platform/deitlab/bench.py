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

from .spec import ExperimentSpec


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
    from .engine import pick_device

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
    from .ray_train import resolve_teacher_file
    from .tracking import Tracking

    return resolve_teacher_file(spec.teacher, Tracking.for_run(spec.run)) if spec.teacher else None


def _bare_run(spec: ExperimentSpec, device) -> tuple[list[dict], float]:
    from .engine import experiment_engine

    start = time.perf_counter()
    engine = experiment_engine(spec, _teacher_file(spec), device=device)
    history = list(engine.run(spec.optim.epochs))
    return history, time.perf_counter() - start


def _ray_run(spec: ExperimentSpec) -> tuple[list[dict], float]:
    from .checkpoints import read_checkpoint
    from .ray_train import TrainJob, fit
    from .tracking import Tracking

    with tempfile.TemporaryDirectory(prefix="deitlab-bench-") as storage:
        spec = spec.with_overrides({"run.storage": storage})
        start = time.perf_counter()
        result = fit(TrainJob(spec, Tracking.for_run(spec.run), run_id=None, name=f"bench-{uuid.uuid4().hex[:8]}"))
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
