"""Teachers and starting weights as files on a node: a checkpoint, a registered model (downloaded once per node),
timm's pretrained weights; what the runs' tags and a registered version's card say of a teacher.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from deitlab.core.checkpoints import Storage, model_file
from deitlab.errors import SpecError
from deitlab.orchestration.records import ray_run_name
from deitlab.spec.schema import TeacherSpec, TeacherTrainingSpec
from deitlab.tracking.store import Tracking


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
        run = tracking.run(run_id)
    except Exception:
        raise SpecError(f"init_from '{source}': no MLflow run '{run_id}' at '{tracking.tracking_uri}'") from None
    params = run.params
    storage = params.get("run.storage", "None")
    if storage == "None":
        storage = str(Path(params.get("run.workdir", ".")) / "ray_results")
    store = Storage.open(storage, create=False)
    found = store.latest_valid(ray_run_name(run.name, run_id))
    if found is None:
        raise SpecError(f"init_from '{source}': run {run_id} has no complete checkpoint in {storage}")
    return _node_cache(f"{storage}|{found[1]}", lambda staging: store.download(found[1], staging))


def teacher_facts(model, payload: dict[str, Any], bundle, path: str | None = None) -> dict[str, Any]:
    """Family, architecture, millions of parameters and forward GFLOPs at the data's size (4 decimals), the
    SHA-256 of the file its weights came from (the hub's file for pretrained and imported weights, else the model
    file), and the accuracy its model file records (trained and imported teachers; None when not measured)."""
    from deitlab.core.models import model_family, model_size
    from deitlab.core.pretrained import file_sha256

    size = model_size(model, bundle.in_chans, bundle.img_size)
    sha = (payload.get("metadata") or {}).get("weights_sha256") or (file_sha256(model_file(path)) if path else None)
    accuracy = (payload.get("metadata") or {}).get("accuracy")
    return {"family": model_family(getattr(model, "teacher", model)), "arch": payload["arch"],
            "params_m": round(size["params_m"], 4), "gflops": round(size["gflops"], 4), "sha256": sha,
            "accuracy": None if accuracy is None else round(float(accuracy), 6)}


def teacher_card(model_file: Path, spec: TeacherTrainingSpec) -> tuple[dict[str, Any], Any]:
    """A registered teacher version's tags (architecture, family, size, and the data it was trained and measured
    on), and that data as loaded."""
    from deitlab.core.models import load_teacher
    from deitlab.data.loaders import data_fingerprint, load_data

    bundle = load_data(spec.data)
    model, payload = load_teacher(model_file, num_classes=bundle.num_classes, in_chans=bundle.in_chans)
    facts = teacher_facts(model, payload, bundle)
    return {"architecture": facts["arch"], "family": facts["family"], "params_m": f"{facts['params_m']:.4f}",
            "gflops": f"{facts['gflops']:.4f}", "img_size": bundle.img_size, "dataset": spec.data.dataset,
            "data_fingerprint": data_fingerprint(bundle), "num_classes": bundle.num_classes}, bundle
