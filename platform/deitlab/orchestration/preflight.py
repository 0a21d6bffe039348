"""The preflight every command runs: everything that can be checked is checked before anything is started or written.

In order, each bad input failing in one line (SpecError): where the runs go (storage, tracking server and its
credentials, S3 credentials, a work directory that can be created, the Ray address); the inputs (image folders
decode, teacher checkpoints, registered models, timm weights and `init_from` files load and fit the data — each
once, MLflow only read); then, with Ray up, whether the workers can ever be placed. A failed check leaves the work
directory as it found it: no `deitlab-work/`, no `mlflow.db`, no `ray_results/`.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

from deitlab.core.checkpoints import Storage, check_aws_credentials, model_file, student_file
from deitlab.errors import SpecError, one_line
from deitlab.orchestration.cluster import check_fits, ensure_ray
from deitlab.orchestration.teachers import resolve_init_file, resolve_teacher_file, teacher_facts
from deitlab.tracking.store import Tracking, check_tracking_server

Status = Callable[[str], ContextManager]  # shows what is being checked (the CLI's spinner)


def _quiet(_: str) -> ContextManager:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Checked:
    """What the preflight found out, handed to the workflow so nothing is loaded twice: each teacher's facts (family,
    architecture, size, SHA-256) by label."""

    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)


def preflight(specs: list, address: str | None = None, status: Status = _quiet, start_ray: bool = True) -> Checked:
    """The whole preflight of a command that trains `specs` (experiments, a sweep's trials, or teacher trainings)."""
    runs = _unique([spec.run for spec in specs])
    check_targets(address, *runs)
    checked = check_inputs(specs, status)
    if start_ray:
        start_cluster(address, *runs, status=status)
    return checked


def _unique(items: list) -> list:
    found: list = []
    for item in items:
        if item not in found:
            found.append(item)
    return found


# ------------------------------------------------------------------------------------------------ where runs go
def check_targets(address: str | None, *runs) -> None:
    """Each run's storage, teacher cache and work directory can be written (probed, nothing left behind) and its S3
    credentials are complete, its tracking server answers and takes the credentials, and the Ray cluster's address
    answers."""
    for run in runs:
        if not run.tracking_uri:  # the default MLflow store is a SQLite file in the work directory
            Storage.probe(str(run.workdir_path), what="the work directory (--workdir)")
        Storage.probe(run.resolved_storage)
        if run.teacher_cache.enabled and run.teacher_cache.storage:  # a cache shared beyond this run's storage
            Storage.probe(run.teacher_cache.storage, what="run.teacher_cache.storage")
        check_tracking_server(run.resolved_tracking_uri)
        if (run.artifacts or "").startswith("s3://"):  # MLflow's boto3 needs them; it would fail only at the end
            check_aws_credentials(f"run.artifacts '{run.artifacts}'")
    if address or os.environ.get("RAY_ADDRESS"):
        check_ray_address(address or os.environ["RAY_ADDRESS"], "--ray-address" if address else "RAY_ADDRESS")
    leave_ray_job_dir(runs)


_RAY_JOB_DIRS = f"{os.sep}runtime_resources{os.sep}working_dir_files{os.sep}"


def leave_ray_job_dir(runs) -> None:
    """Under `ray job submit --working-dir DIR`, this process starts in Ray's unpacked copy of DIR, a temporary folder
    Ray owns and removes (cache clean-up, a new session) — reported removed under a running job on a two-node
    cluster, where MLflow's client then failed in os.getcwd(). Records kept there would be lost with it: a run whose
    MLflow store, checkpoints or artifacts would land inside is refused (a relative --workdir does that). Then the
    process moves to a folder that stays; every path it uses was made absolute when its spec was loaded."""
    try:
        cwd = Path.cwd()
    except FileNotFoundError:
        return
    if _RAY_JOB_DIRS not in f"{cwd}{os.sep}":
        return
    for run in runs:
        local = {"the MLflow store": "" if run.tracking_uri else str(run.workdir_path / "mlflow.db"),
                 "checkpoints": run.resolved_storage,
                 "artifacts": run.artifacts or ("" if run.tracking_uri else str(run.workdir_path / "mlartifacts"))}
        paths = {what: Path(uri.removeprefix("file://")) for what, uri in local.items()
                 if uri and "://" not in uri.removeprefix("file://")}
        lost = [(what, path) for what, path in paths.items() if path.resolve().is_relative_to(cwd)]
        if lost:
            what, path = lost[0]
            raise SpecError(f"{what} would be kept in {path}, inside this Ray job's temporary working_dir, which Ray"
                            " deletes: give an absolute --workdir outside it (or run.tracking_uri and run.storage)")
    os.chdir(Path.home() if Path.home().is_dir() else Path("/"))


def check_ray_address(address: str, what: str) -> None:
    """A Ray cluster address that can be joined: HEAD:6379 (the GCS) or ray://HEAD:10001 (Ray Client), with something
    listening. ray.init would retry an address where nothing listens for minutes, printing a warning every few
    seconds; a dashboard URL (what `sweep submit --address` takes) is the usual mix-up."""
    import socket
    from urllib.parse import urlsplit

    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise SpecError(f"{what} '{address}': that is a dashboard URL (for `sweep submit --address`); give the"
                        " cluster's GCS address, HEAD:6379, or ray://HEAD:10001")
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number
        host = port = None
    if parts.scheme not in ("gcs", "ray") or not host or port is None:
        raise SpecError(f"{what} '{address}': expected HEAD:PORT (the GCS, e.g. 10.0.0.5:6379) or ray://HEAD:10001")
    try:
        socket.create_connection((host, port), timeout=5).close()
    except TimeoutError:
        raise SpecError(f"{what} '{address}': no Ray cluster answers there (no answer within 5 s)") from None
    except OSError as e:  # refused, unknown host, unreachable network
        raise SpecError(f"{what} '{address}': no Ray cluster answers there ({e.strerror or type(e).__name__})"
                        ) from None


# ------------------------------------------------------------------------------------------------ inputs
def check_inputs(specs: list, status: Status = _quiet) -> Checked:
    """Every input the runs read, each once: image folders decode; `init_from` files, runs and registered models load
    as DeiT students; teachers (checkpoints, registered models, timm's pretrained weights) load and fit the data
    (architecture, classes, channels); a teacher training's pretrained weights are in the hub cache. Missing,
    truncated and foreign local files fail before torch is imported. MLflow is only read: a registered model or run
    in a store that does not exist yet is an error, not a new store."""
    data_sets: list = []  # (data spec, its loaded bundle or None)
    teachers: dict[str, dict[str, Any]] = {}
    done: list = []  # init_from sources, (teacher, data) pairs and pretrained archs already checked

    def bundle(data):
        from deitlab.data.loaders import load_data

        index = next(i for i, (known, _) in enumerate(data_sets) if known == data)
        if data_sets[index][1] is None:
            data_sets[index] = (data, load_data(data))
        return data_sets[index][1]

    for spec in specs:
        if all(known != spec.data for known, _ in data_sets):
            if spec.data.path:  # digits and synthetic data have nothing to check
                from deitlab.data.shards import check_readable

                with status(f"checking the {spec.data.dataset} data at {spec.data.path}…"):
                    check_readable(spec.data)  # an image folder: every image is decoded once
            data_sets.append((spec.data, None))
        reader = Tracking.reader(spec.run)
        init_from = getattr(spec, "init_from", None)
        if init_from and init_from not in done:
            _check_init_from(init_from, reader)
            done.append(init_from)
        teacher = getattr(spec, "teacher", None)
        if teacher is not None and (teacher, spec.data) not in done:
            with status(f"loading the teacher {teacher.label}…"):
                teachers[teacher.label] = _load_teacher(teacher, bundle(spec.data), reader)
            done.append((teacher, spec.data))
        if getattr(spec, "pretrained", False) and spec.arch not in done:  # a teacher fine-tuned from hub weights
            from deitlab.core.pretrained import create_pretrained

            with status(f"loading the pretrained weights of {spec.arch}…"):
                create_pretrained(spec.arch)
            done.append(spec.arch)
    return Checked(teachers)


def _check_init_from(source: str, reader) -> None:
    from deitlab.core.models import student_weights

    if not source.startswith(("runs:/", "models:/")):
        student_file(source)  # missing or truncated: before torch is imported
    student_weights(resolve_init_file(source, reader))  # loads, and refuses weights that are not a DeiT student's


def _load_teacher(teacher, bundle, reader) -> dict[str, Any]:
    """Load the teacher as the workers will and say what the runs' tags say of it; errors name the teacher."""
    from deitlab.core.models import build_teacher

    try:
        if teacher.checkpoint:
            model_file(teacher.checkpoint)  # missing or truncated: before torch is imported
        path = resolve_teacher_file(teacher, reader)
        model, payload = build_teacher(teacher, path, bundle)
    except SpecError as e:  # say whose it is: a sweep's teachers have names
        text = str(e)
        raise SpecError(f"teacher '{teacher.name}': {text}" if teacher.name else
                        text if text.startswith("teacher") else f"teacher: {text}") from None
    return teacher_facts(model, payload, bundle, path)


# ------------------------------------------------------------------------------------------------ the cluster
def join_ray(address: str | None, status: Status = _quiet) -> None:
    """Start a local Ray, or join `address` / RAY_ADDRESS; a cluster that cannot be joined is one line."""
    what = "--ray-address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    with status("starting Ray…" if not address else "connecting to Ray…"):
        try:
            ensure_ray(address)
        except (ConnectionError, TimeoutError, ValueError) as e:  # what ray.init raises for a cluster it cannot join
            raise SpecError(f"{what} '{address}': cannot join a Ray cluster there ({one_line(e, 200)})") from None


def start_cluster(address: str | None, *runs, status: Status = _quiet) -> None:
    """The preflight's last part: Ray up (join_ray), and the workers of every run placeable on it (counting the
    nodes its autoscaler may add). What a command runs after `preflight(..., start_ray=False)` and its own checks."""
    join_ray(address, status)
    check_fits(*runs)
