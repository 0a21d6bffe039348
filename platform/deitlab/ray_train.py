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

from .checkpoints import Storage, write_checkpoint
from .errors import SpecError, TrainingDiverged, one_line
from .spec import ExperimentSpec, RunSpec, TeacherSpec, TeacherTrainingSpec
from .tracking import (DIVERGED_TAG, GIT_COMMIT_TAG, TEACHER_FAMILY_TAG, TEACHER_SHA_TAG, MetricLogger, Tracking,
                       git_commit)

log = logging.getLogger("deitlab.train")

MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, as one typed object: the spec, where to track, the MLflow run, the Ray run name."""

    spec: ExperimentSpec | TeacherTrainingSpec
    tracking: Tracking
    run_id: str | None = None
    name: str = "run"  # Ray Train run name = the run's directory in storage

    @property
    def is_teacher(self) -> bool:
        return isinstance(self.spec, TeacherTrainingSpec)


def ray_run_name(run_name: str, run_id: str) -> str:
    """The storage directory of an MLflow run's Ray Train run: `--resume` finds it again from the run id."""
    return f"{run_name}-{run_id[:8]}"


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
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        # A local Ray is never preempted (spot reclaim); its watcher would be one more process per trial.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # One logical CPU more than the cores: a worker waiting on MLflow or a checkpoint upload leaves its core to
        # another.
        # address="local": always a new local Ray, never one a stale /tmp/ray/ray_current_cluster points at.
        # The dashboard serves Ray's state API, which Train's placement-group cleaner needs: without it the workers'
        # placement group of a trial that ASHA stopped is never removed, and a long sweep runs out of CPUs. Its port
        # is chosen here and given to every worker: with two Rays on one machine the API cannot be auto-detected.
        port = _free_port()
        ray.init(address="local", num_cpus=num_cpus or (os.cpu_count() or 1) + 1, include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=False, configure_logging=True,
                 logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------- teachers
def _node_cache(key: str, fill) -> str:
    """A directory filled once per node by `fill(staging_dir)`, atomically: concurrent workers race harmlessly."""
    cache = Path(tempfile.gettempdir()) / "deitlab-cache" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
        try:
            fill(staging)
            staging.rename(cache)
        except OSError:
            if not cache.exists():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(cache)


def resolve_teacher_file(teacher: TeacherSpec, tracking: Tracking) -> str | None:
    """A local model file for the teacher: its checkpoint, or its MLflow URI downloaded once per node (None for
    timm's pretrained weights: timm reads them from the hub cache)."""
    if teacher.pretrained:
        return None
    if teacher.checkpoint is not None:
        return teacher.checkpoint
    return _registry_download(teacher.uri, tracking)


def _registry_download(uri: str, tracking: Tracking) -> str:
    # Key the cache on the artifact location, not the URI: models:/NAME/latest moves when a new version is registered.
    source = tracking.model_source(uri) if uri.startswith("models:/") else uri
    return _node_cache(f"{tracking.tracking_uri}|{source}", lambda staging: tracking.download(source, staging))


def resolve_init_file(source: str, tracking: Tracking) -> str:
    """A local checkpoint for `init_from`: a path as given, a registered model's file, or the newest complete
    checkpoint of a deitlab run (runs:/RUN_ID, found in the storage that run recorded)."""
    if source.startswith("models:/"):
        return _registry_download(source, tracking)
    if not source.startswith("runs:/"):
        return source
    run_id = source.removeprefix("runs:/").strip("/").split("/")[0]
    try:
        run = tracking.client.get_run(run_id)
    except Exception:
        raise SpecError(f"init_from '{source}': no MLflow run '{run_id}' at '{tracking.tracking_uri}'") from None
    params = run.data.params
    storage = params.get("run.storage", "None")
    if storage == "None":
        storage = str(Path(params.get("run.workdir", ".")) / "ray_results")
    store = Storage.open(storage, create=False)
    found = store.latest_valid(ray_run_name(run.info.run_name, run_id))
    if found is None:
        raise SpecError(f"init_from '{source}': run {run_id} has no complete checkpoint in {storage}")
    return _node_cache(f"{storage}|{found[1]}", lambda staging: store.download(found[1], staging))


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


def open_run_log(tracking: Tracking, run_id: str, history: list[dict[str, float]], nodes: list[str],
                 resumed_from: str | None, epoch: int) -> tuple[MetricLogger, set[int]]:
    """Rank 0 at a (re)start of a run: its metric logger, and the epochs MLflow holds. Tags the ranks' nodes and
    records a resume from a checkpoint.

    MLflow holds each epoch once: epochs it already has (logged before a failure) are not logged again, and epochs the
    checkpoint's `history` has but MLflow lacks (a failure between checkpoint and logging) are filled in. When MLflow
    cannot be asked, nothing is refilled here: the driver fills gaps at the end.
    """
    # Rank 0 never waits on MLflow: a call to an unreachable server gives up after ~10 s (MLflow's default is several
    # minutes of retries) and the metric logger keeps the values until the server is back.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    metrics_log = MetricLogger(tracking, run_id)
    tracking.try_set_tags(run_id, {"deitlab.worker_nodes": ",".join(nodes)})
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One rank: build the engine, resume, then per epoch report (+ checkpoint) and log to MLflow exactly once."""
    import ray.train

    from .engine import experiment_engine, pick_device, teacher_engine

    job: TrainJob = config["job"]
    spec = job.spec
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if spec.run.gpus_per_worker > 0 else pick_device(spec.run)
    if job.is_teacher:
        engine = teacher_engine(spec, device=device, rank=rank, world_size=world_size)
    else:
        teacher_file = resolve_teacher_file(spec.teacher, job.tracking) if spec.teacher else None
        init_file = resolve_init_file(spec.init_from, job.tracking) if spec.init_from else None
        engine = experiment_engine(spec, teacher_file, device=device, rank=rank, world_size=world_size,
                                   init_file=init_file)
    resumed_from = _restore(engine, Storage.open(spec.run.resolved_storage, create=False), job.name, device)
    nodes = _worker_nodes(world_size)

    tracked = rank == 0 and job.run_id is not None
    metrics_log = system_monitor = None
    logged: set[int] = set()
    if tracked:
        metrics_log, logged = open_run_log(job.tracking, job.run_id, engine.history, nodes, resumed_from, engine.epoch)
        engine.on_step = metrics_log.log
        system_monitor = _system_metrics(job)
        if resumed_from:
            log.warning("%s: resumed from checkpoint %s (epoch %d)", job.name, resumed_from, engine.epoch)

    try:
        _train_epochs(job, engine, rank, logged, metrics_log)
    except FloatingPointError as err:
        # Deterministic: restarting from the last checkpoint would diverge again. End this attempt cleanly and let
        # the driver fail the run with the reason (the loss is all-reduced, so every rank stops at the same epoch).
        if job.run_id is None:
            raise
        log.warning("%s: %s", job.name, err)
        job.tracking.try_set_tags(job.run_id, {DIVERGED_TAG: str(err)})
    finally:
        if system_monitor is not None:
            try:
                system_monitor.finish()
            except Exception as err:  # the run trained: a lost last sample is only a warning
                log.warning("the last system metrics were not recorded (%s)", one_line(err, 200))
        if metrics_log is not None:
            metrics_log.close()


def _system_metrics(job: TrainJob):
    """MLflow's system-metrics monitor (CPU, memory, disk, network; GPU with nvidia-ml-py) on rank 0's node, or None
    where psutil is missing or the monitor cannot start."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        class FlushingMonitor(SystemMetricsMonitor):
            """MLflow's monitor drops the samples of its last, unfinished interval, so a run shorter than one
            interval would record no system metrics at all: at the end, one more sample is taken and what was
            collected since the last publication is logged."""

            def finish(self):
                running = self._process is not None
                super().finish()  # stops and joins the sampling thread, flushes what it queued
                if running:
                    self.collect_metrics()
                    self.publish_metrics(self.aggregate_metrics())
                    self.mlflow_logger.flush()

        monitor = FlushingMonitor(job.run_id, sampling_interval=5, resume_logging=True,
                                  tracking_uri=job.tracking.tracking_uri)
        monitor.start()
        return monitor
    except Exception as err:
        log.warning("system metrics are not recorded (%s)", one_line(err, 200))
        return None


def _train_epochs(job: TrainJob, engine, rank: int, logged: set[int], metrics_log: MetricLogger | None) -> None:
    """Per epoch: report (rank 0 adds a checkpoint every N epochs and at the end), then log to MLflow once."""
    import ray.train

    from .models import save_model
    from .run_artifacts import write_checkpoint_extras

    spec = job.spec
    tracked = metrics_log is not None
    epochs, every = spec.optim.epochs, spec.run.checkpoint_every
    for metrics in engine.run(epochs):
        last = engine.epoch == epochs
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0 and (last or engine.epoch % every == 0):
                extra: tuple[str, ...] = ()
                if last and job.is_teacher:
                    bundle = engine.bundle
                    save_model(Path(tmp) / MODEL_FILE, engine.model, arch=spec.arch, model_kwargs=spec.model_kwargs,
                               num_classes=bundle.num_classes, in_chans=bundle.in_chans,
                               metadata={"accuracy": metrics["acc"], "img_size": bundle.img_size,
                                         "mean": bundle.mean, "std": bundle.std})
                    extra = (MODEL_FILE,)
                extra += write_checkpoint_extras(tmp, engine.history, engine.confusion)
                write_checkpoint(tmp, engine.state_dict(), extra_files=extra)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)  # returns once the checkpoint is in storage
        if tracked and engine.epoch not in logged:
            metrics_log.log(metrics, step=engine.epoch)
            logged.add(engine.epoch)


# --------------------------------------------------------------------------------------------------- driver side
def worker_resources(run: RunSpec) -> dict[str, float]:
    """One worker's Ray resource bundle: CPUs, GPUs and the spec's custom resources."""
    return {"CPU": run.cpus_per_worker, **({"GPU": run.gpus_per_worker} if run.gpus_per_worker > 0 else {}),
            **run.resources}


def scaling_config(run: RunSpec):
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=run.workers, use_gpu=run.gpus_per_worker > 0,
                         resources_per_worker=worker_resources(run), placement_strategy=run.placement.upper())


NodeShape = tuple[dict[str, float], float]  # one node's resources, and how many such nodes (inf: no limit)


def cluster_shapes() -> tuple[list[NodeShape], bool, bool]:
    """The nodes the Ray cluster has now, plus those its autoscaler may add (its node groups, up to their max count,
    where the autoscaler publishes them). Returns (shapes, autoscaling, whether nodes of unknown shapes may be added)."""
    import ray
    from ray._private.state import state

    shapes: list[NodeShape] = [(dict(n["Resources"]), 1.0) for n in ray.nodes() if n.get("Alive")]
    try:
        config = state.get_cluster_config()
    except Exception:
        config = None
    groups = [(dict(g.resources), float("inf") if g.max_count < 0 else float(g.max_count))
              for g in (config.node_group_configs if config is not None else []) if g.max_count != 0]
    unknown = not groups and _autoscaler_adds_nodes()
    return shapes + groups, bool(groups) or unknown, unknown


def _autoscaler_adds_nodes() -> bool:
    """Whether an autoscaler may add nodes of its own node types (the cluster launcher's, KubeRay's). Ray 2.60's
    autoscalers do not publish their node groups' shapes (state.get_cluster_config() stays empty): v1 names its node
    types in its status (a cluster without an autoscaler config shows only `node_<id>` types), and v2 runs only where
    KubeRay or the launcher enabled it."""
    import json

    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        if is_autoscaler_v2(fetch_from_server=True):
            return True
        status = json.loads(_internal_kv_get("__autoscaling_status") or b"{}")
    except Exception:
        return False
    types = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(not str(name).startswith("node_") for name in types.values())


def placement_problem(run: RunSpec, shapes: list[NodeShape], autoscaling: bool = False,
                      unknown_nodes: bool = False) -> str | None:
    """Why the workers can never be placed on nodes of these shapes, or None when they can.

    Each worker's bundle (CPUs, GPUs, custom resources) must fit on one node, `strict_spread` needs a node per worker,
    and all workers must fit the cluster at its largest.
    """
    need = worker_resources(run)
    need.setdefault("GPU", 0.0)  # the cluster's GPUs are shown even when a worker needs none
    if unknown_nodes:
        return None  # an autoscaler may add nodes of shapes not known here: nothing can be ruled out

    def fits(node: dict[str, float]) -> bool:
        return all(node.get(k, 0.0) >= v for k, v in need.items() if v > 0)

    fitting = sum(count for node, count in shapes if fits(node))
    total = {k: sum(node.get(k, 0.0) * count for node, count in shapes if node.get(k, 0.0) > 0) for k in need}
    request = f"{run.workers} worker(s) × " + " + ".join(f"{v:g} {k}" for k, v in need.items() if v > 0)
    cluster = ", ".join(f"{total[k]:g} {k}" for k in need) + (" at most, with autoscaling" if autoscaling else
                                                              f" on {len(shapes)} node(s)")
    if fitting == 0:
        return f"run: {request} can never start: no node of the Ray cluster ({cluster}) fits one worker"
    if run.placement == "strict_spread" and fitting < run.workers:
        return (f"run: {request} with placement strict_spread needs {run.workers} nodes that fit a worker; the Ray"
                f" cluster has {fitting:g}")
    if any(run.workers * v > total[k] + 1e-9 for k, v in need.items()):
        return (f"run: {request} can never start on the Ray cluster ({cluster}): lower run.workers or the resources"
                " per worker")
    return None


def check_fits(*runs: RunSpec) -> None:
    """Fail in one line, before anything starts, when the workers of any of `runs` can never be placed on this Ray
    cluster (counting the nodes its autoscaler may add). The cluster is asked once."""
    shapes = cluster_shapes()
    problem = next(filter(None, (placement_problem(run, *shapes) for run in runs)), None)
    if problem:
        raise SpecError(problem)


def _failure_recorder(job: TrainJob):
    """A Train callback (it runs in the Train controller) that records worker failures on the MLflow run."""
    from ray.train import UserCallback

    class FailureRecorder(UserCallback):
        def __init__(self):
            self.failures = 0

        def after_exception(self, run_context, worker_exceptions):
            self.failures += 1
            rank, error = next(iter(sorted(worker_exceptions.items())))
            text = one_line(error, 250)
            job.tracking.try_set_tags(job.run_id, {"deitlab.worker_failures": self.failures,
                                               "deitlab.last_failure": f"rank {rank}: {text}"})

    return FailureRecorder()


def fit(job: TrainJob, callbacks: list | None = None):
    """Run one TorchTrainer to completion; returns Ray's Result (checkpoint = the last epoch's).

    Worker failures restart the worker group from the latest checkpoint up to run.max_failures times. A run
    started again under the same name and storage (`--resume`) continues from its latest checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    run = job.spec.run
    storage = Storage.open(run.resolved_storage)
    if job.run_id:
        callbacks = [*(callbacks or []), _failure_recorder(job)]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=scaling_config(run),
        run_config=RunConfig(
            name=job.name, storage_path=storage.root, storage_filesystem=storage.filesystem,
            callbacks=callbacks or [], failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints,
                                               checkpoint_score_attribute=run.checkpoint_metric,
                                               checkpoint_score_order=run.checkpoint_order)),
    )
    return trainer.fit()


# --------------------------------------------------------------------------------------------------- workflows
@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    metrics: dict[str, Any]
    model_uri: str | None = None  # teachers: the registered version


def preflight_teachers(teachers: list[TeacherSpec], data, tracking: Tracking,
                       init_from: str | None = None) -> dict[str, dict[str, Any]]:
    """Resolve and load every teacher (and the student's init_from) once in the driver, so a bad checkpoint or URI
    fails before Ray starts work. Returns what the runs' tags say of each teacher, by label: family, arch, size."""
    from .data import load_data
    from .models import build_teacher, student_weights

    if init_from:
        student_weights(resolve_init_file(init_from, tracking))
    if not teachers:
        return {}
    bundle = load_data(data)
    found = {}
    for teacher in teachers:
        path = resolve_teacher_file(teacher, tracking)
        model, payload = build_teacher(teacher, path, bundle)
        found[teacher.label] = _teacher_facts(model, payload, bundle, path)
    return found


def _teacher_facts(model, payload: dict[str, Any], bundle, path: str | None = None) -> dict[str, Any]:
    """Family, architecture, millions of parameters and forward GFLOPs at the data's size (4 decimals), and the
    SHA-256 of the file its weights came from (the hub's file for pretrained and imported weights, else the model
    file)."""
    from .checkpoints import model_file
    from .models import model_family, model_size
    from .pretrained import file_sha256

    size = model_size(model, bundle.in_chans, bundle.img_size)
    sha = (payload.get("metadata") or {}).get("weights_sha256") or (file_sha256(model_file(path)) if path else None)
    return {"family": model_family(getattr(model, "teacher", model)), "arch": payload["arch"],
            "params_m": round(size["params_m"], 4), "gflops": round(size["gflops"], 4), "sha256": sha}


def run_tags(spec: ExperimentSpec, teachers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The tags an experiment's MLflow run is found and grouped by in the UI: mode, student, teacher and its family."""
    teacher = spec.teacher.label if spec.teacher else "none"
    info = teachers.get(teacher, {}) if spec.distillation.spec_mode.needs_teacher else {}
    tags = {"deitlab.mode": spec.distillation.mode, "deitlab.student": spec.student.arch,
            "deitlab.token": spec.distillation.uses_token, "deitlab.teacher": teacher,
            TEACHER_FAMILY_TAG: info.get("family", "none")}
    if info:
        tags.update({"deitlab.teacher_arch": info["arch"], "deitlab.teacher_gflops": info["gflops"]})
        if info.get("sha256"):
            tags[TEACHER_SHA_TAG] = info["sha256"]
    return tags


def common_tags(run: RunSpec) -> dict[str, Any]:
    """Tags of every run, sweep parents included: the deitlab commit that ran it and the user's own run.tags."""
    commit = git_commit()
    return {**({GIT_COMMIT_TAG: commit} if commit else {}), **run.tags}


def _record_results(job: TrainJob, result) -> None:
    """After a successful fit: fill in epochs MLflow lacks, then log curves, confusion matrix and best weights.

    Read from the checkpoints in storage (history.json, confusion.json, the best state.pt), not from the workers:
    this runs in the driver, which retries an unreachable tracking server for minutes.
    """
    from .run_artifacts import HISTORY_FILE

    tracking, run_id, spec = job.tracking, job.run_id, job.spec
    last = result.checkpoint
    if last is None:
        return
    storage = Storage.open(spec.run.resolved_storage, create=False)
    history = _read_json(storage, last.path, HISTORY_FILE) or []
    fill_from_history(tracking, run_id, history, job.name)
    try:
        _log_run_files(job, result, storage, history)
    except Exception as err:  # the run trained and its metrics are in MLflow: a missing figure does not fail it
        log.warning("%s: evaluation artifacts not recorded (%s)", job.name, one_line(err, 200))


def _log_run_files(job: TrainJob, result, storage: Storage, history: list[dict[str, float]],
                   best_model=None) -> None:
    """Curves, confusion matrix and (students) the best model as artifacts of the run. `best_model` loads the
    student's state from a checkpoint path (default: the checkpoint's own state; packs pick their member's)."""
    import json

    from .run_artifacts import CONFUSION_FILE, confusion_json, confusion_png, curves_png

    tracking, run_id, spec, last = job.tracking, job.run_id, job.spec, result.checkpoint
    title = f"{spec.name if job.is_teacher else job.name}"
    with tempfile.TemporaryDirectory() as tmp:
        files = [curves_png(history, Path(tmp) / "curves.png", title)]
        confusion = _read_json(storage, last.path, CONFUSION_FILE)
        if confusion:
            head = "cls" if job.is_teacher else spec.distillation.eval_head
            (Path(tmp) / "confusion_matrix.json").write_text(json.dumps(confusion_json(confusion, head), indent=1))
            files += [Path(tmp) / "confusion_matrix.json",
                      confusion_png(confusion, Path(tmp) / "confusion_matrix.png", f"{title} ({head} head)")]
        for path in files:
            if path is not None:
                tracking.log_artifact(run_id, path, "evaluation")
        if not job.is_teacher:
            _log_best_model(job, result, storage, Path(tmp), best_model or storage.load)


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
    from .run_artifacts import HISTORY_FILE

    try:
        storage = Storage.open(storage_uri, create=False)
        newest = storage.checkpoints(ray_run_name(run_name, run_id))
        history = _read_json(storage, newest[0], HISTORY_FILE) if newest else None
        if history:
            fill_from_history(tracking, run_id, history, run_name)
    except Exception as err:  # best effort: the run's own record stands
        log.warning("%s: could not compare MLflow with the checkpoint (%s)", run_name, one_line(err, 200))


def _log_best_model(job: TrainJob, result, storage: Storage, tmp: Path, load) -> None:
    """The kept checkpoint that is best by run.checkpoint_metric, as a deitlab model file: `best_model/model.pt`."""
    from .data import load_data
    from .models import write_model_file

    spec = job.spec
    metric, order = spec.run.checkpoint_metric, spec.run.checkpoint_order
    kept = [(c, m) for c, m in (result.best_checkpoints or []) if metric in m]
    if not kept:
        return
    checkpoint, metrics = (max if order == "max" else min)(kept, key=lambda cm: cm[1][metric])
    state = load(checkpoint.path)
    bundle = load_data(spec.data)
    token = spec.distillation.uses_token
    path = write_model_file(tmp / "best_model" / "model.pt", state["model"], arch=spec.student.timm_name(token),
                            model_kwargs=spec.student.timm_kwargs(bundle.img_size), num_classes=bundle.num_classes,
                            in_chans=bundle.in_chans,
                            metadata={"epoch": int(state["epoch"]), metric: metrics[metric], "run_id": job.run_id,
                                      "img_size": bundle.img_size, "mean": bundle.mean, "std": bundle.std})
    job.tracking.log_artifact(job.run_id, path, "best_model")
    job.tracking.set_tags(job.run_id, {"deitlab.best_epoch": int(state["epoch"]), f"deitlab.best_{metric}": metrics[metric]})


def tracked_fit(job_spec, tracking: Tracking, run_name: str, tags: dict[str, str], callbacks=None,
                parent_id: str | None = None, on_success=None, resume_run_id: str | None = None) -> TrainOutcome:
    """Open (or reopen) an MLflow run, fit, and close it FINISHED, FAILED or KILLED (never left RUNNING)."""
    from .tracking import RESUMED_FROM_TAG, RESUMES_TAG

    if resume_run_id:
        run_id = resume_run_id
        tracking.reopen_run(run_id)
    else:
        run_id = tracking.start_run(run_name, params=job_spec.flat_params(), tags={**common_tags(job_spec.run), **tags},
                                    parent_id=parent_id)
        tracking.log_json(run_id, "spec.json", job_spec.model_dump(mode="json", by_alias=True))
    job = TrainJob(job_spec, tracking, run_id, ray_run_name(run_name, run_id))
    try:
        result = fit(job, callbacks=callbacks)
        recorded = tracking.client.get_run(run_id).data.tags
        if DIVERGED_TAG in recorded:  # the workers stopped early (and were not restarted)
            raise TrainingDiverged(f"{run_name}: {recorded[DIVERGED_TAG]} (MLflow run {run_id})")
        _record_results(job, result)
        extra = on_success(run_id, result) if on_success else None
    except KeyboardInterrupt:
        tracking.end_if_running(run_id, "KILLED")
        raise
    except BaseException:
        tracking.end_if_running(run_id, "FAILED")
        raise
    tracking.end_run(run_id, "FINISHED")
    if RESUMED_FROM_TAG in recorded:
        log.warning("%s: resumed %s time(s), last from checkpoint %s", run_name, recorded.get(RESUMES_TAG, "1"),
                    recorded[RESUMED_FROM_TAG])
    return TrainOutcome(run_id, dict(result.metrics or {}), extra)


def train_experiment(spec: ExperimentSpec, resume: bool = False, run_id: str | None = None) -> TrainOutcome:
    """Train one experiment as a new MLflow run, or (resume) continue an unfinished one from its last checkpoint."""
    from .tracking import KIND_TAG

    tracking = Tracking.for_run(spec.run)
    tracking.experiment_id()
    storage = Storage.open(spec.run.resolved_storage)  # a bad or unreachable storage URI fails here, in one line
    check_fits(spec.run)
    resume_id = None
    if resume:
        resume_id = tracking.resumable_run(spec.name, spec.flat_params(), run_id).info.run_id
        # Checked here too, so damaged checkpoints are reported where the user is looking; the workers repeat it.
        found = storage.latest_valid(ray_run_name(spec.name, resume_id))
        if found is None:
            log.warning("run %s has no complete checkpoint: it starts again from epoch 0", resume_id)
        else:
            log.warning("resuming run %s from checkpoint %s (epoch %d)", resume_id, storage.display(found[1]),
                        found[0]["epoch"])
    teachers = preflight_teachers([spec.teacher] if spec.teacher else [], spec.data, tracking, spec.init_from)
    return tracked_fit(spec, tracking, spec.name, {KIND_TAG: "train", **run_tags(spec, teachers)},
                       resume_run_id=resume_id)


def train_teacher(spec: TeacherTrainingSpec, callbacks: list | None = None) -> TrainOutcome:
    """Train a classifier with Ray Train, log its model file, and register it as a new version of `spec.name`."""
    from .tracking import KIND_TAG, TEACHER_ACC_TAG

    tracking = Tracking.for_run(spec.run)
    tracking.experiment_id()

    def register(run_id: str, result) -> str:
        with result.checkpoint.as_directory() as directory:
            tracking.log_artifact(run_id, Path(directory) / MODEL_FILE, "teacher")
            card = teacher_card(Path(directory) / MODEL_FILE, spec)
        uri = tracking.register_teacher(run_id, "teacher", spec.name, result.metrics["acc"], tags=card,
                                        alias=spec.alias)
        tracking.set_tags(run_id, {"deitlab.model_uri": uri, TEACHER_ACC_TAG: result.metrics["acc"],
                                   TEACHER_FAMILY_TAG: card["family"]})
        return uri

    return tracked_fit(spec, tracking, f"teacher-{spec.name}", {KIND_TAG: "teacher", "deitlab.teacher": spec.name},
                        callbacks=callbacks, on_success=register)


def teacher_card(model_file: Path, spec: TeacherTrainingSpec) -> dict[str, Any]:
    """A registered teacher version's tags: architecture, family, size, and the data it was trained and measured on."""
    from .data import data_fingerprint, load_data
    from .models import load_teacher

    bundle = load_data(spec.data)
    model, payload = load_teacher(model_file, num_classes=bundle.num_classes, in_chans=bundle.in_chans)
    facts = _teacher_facts(model, payload, bundle)
    return {"architecture": facts["arch"], "family": facts["family"], "params_m": f"{facts['params_m']:.4f}",
            "gflops": f"{facts['gflops']:.4f}", "img_size": bundle.img_size, "dataset": spec.data.dataset,
            "data_fingerprint": data_fingerprint(bundle), "num_classes": bundle.num_classes}
