"""`deitlab teacher import`: timm / Hugging Face hub weights fetched once, on this machine, and registered in MLflow.

Clusters are often offline and hubs rate-limit: a sweep names the registered version (models:/NAME@ALIAS) and its
workers read the weights from MLflow's artifact store, never from the hub. The version's card says where the weights
came from (timm name with tag), their file's SHA-256, size, the input convention (mean, std, image size) and, when a
data spec is given, the accuracy on its validation split — or why there is none.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deitlab.errors import SpecError
from deitlab.orchestration.lineage import TEACHER_MODEL_PARAMS, log_model_file, record_datasets
from deitlab.spec.base import validate
from deitlab.spec.loading import read_yaml
from deitlab.spec.schema import HF_HUB_PREFIX, DataSpec, RunSpec
from deitlab.tracking.names import (
    KIND_TAG,
    MODEL_URI_TAG,
    TEACHER_ACC_TAG,
    TEACHER_FAMILY_TAG,
    TEACHER_SHA_TAG,
    TEACHER_TAG,
)
from deitlab.tracking.store import Tracking

log = logging.getLogger("deitlab.teacher_import")


@dataclass(frozen=True)
class ImportedTeacher:
    uri: str  # models:/NAME/VERSION
    run_id: str
    card: dict[str, Any]


def _architecture(name: str) -> tuple[str, dict[str, Any]]:
    """The timm architecture (with tag) and model arguments a worker builds without the hub: a hf-hub: name is
    resolved here, from its config.json."""
    if not name.startswith(HF_HUB_PREFIX):
        return name, {}
    from timm.models import load_model_config_from_hf

    _, arch, model_args = load_model_config_from_hf(name.removeprefix(HF_HUB_PREFIX))
    return arch, dict(model_args or {})


def import_teacher(name: str, registered: str, run: RunSpec, data: DataSpec | None = None,
                   alias: str | None = None) -> ImportedTeacher:
    """Load `name`'s pretrained weights through timm, write them as a deitlab model file, log it to a new MLflow run
    and register it as a new version of `registered` with its card."""
    import torch

    from deitlab.core.engine import classifier_accuracy
    from deitlab.core.models import model_family, model_size, write_model_file
    from deitlab.core.pretrained import InputConfig, adapt_teacher, create_pretrained, file_sha256, weights_file
    from deitlab.data.loaders import data_fingerprint, input_config, load_data

    model = create_pretrained(name).eval()
    in_chans = int(getattr(model, "in_chans", 3) or 3)
    source = weights_file(model)
    sha = file_sha256(source) if source else None
    own = InputConfig.of_model(model, in_chans) or InputConfig((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224)
    accuracy, why_none, bundle = None, "no --data given", None
    if data is not None:
        bundle = load_data(data)
        if (bundle.num_classes, bundle.in_chans) != (model.num_classes, in_chans):
            why_none = (f"the data has {bundle.num_classes} classes and {bundle.in_chans} channels, the weights"
                        f" {model.num_classes} and {in_chans}")
        else:
            teacher = adapt_teacher(model, input_config(bundle), own)
            accuracy, why_none = classifier_accuracy(teacher, bundle, data, torch.device("cpu")), None
    img_size = bundle.img_size if bundle is not None else own.img_size
    size = model_size(model, in_chans, img_size)
    arch, model_kwargs = _architecture(name)
    card = {"source": name, "weights_sha256": sha or "unknown (timm did not read a file this machine can name)",
            "architecture": arch, "family": model_family(model), "params_m": f"{size['params_m']:.4f}",
            "gflops": f"{size['gflops']:.4f}", "gflops_img_size": img_size, "mean": list(own.mean),
            "std": list(own.std), "img_size": own.img_size, "num_classes": model.num_classes, "in_chans": in_chans}
    if bundle is not None:
        card.update({"dataset": data.dataset, "data_fingerprint": data_fingerprint(bundle)})
    if accuracy is None:
        card["accuracy_note"] = f"not measured: {why_none}"

    tracking = Tracking.for_run(run)
    tracking.experiment_id()
    run_id = tracking.start_run(f"import-{registered}", params={"source": name, "registered": registered},
                                tags={KIND_TAG: "teacher", TEACHER_TAG: registered, TEACHER_SHA_TAG: sha or "",
                                      TEACHER_FAMILY_TAG: card["family"]})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            metadata = {"source": name, "weights_sha256": sha, "mean": list(own.mean), "std": list(own.std),
                        "img_size": own.img_size, "accuracy": accuracy}
            path = write_model_file(Path(tmp) / "model.pt", model.state_dict(), arch=arch, model_kwargs=model_kwargs,
                                    num_classes=model.num_classes, in_chans=in_chans, metadata=metadata)
            params = {k: card[k] for k in TEACHER_MODEL_PARAMS if k in card} | {"source": name}
            if bundle is not None:  # measured on the data: the accuracy is linked to it
                logged = log_model_file(tracking, run_id, path, registered, metrics={"acc": accuracy}
                                        if accuracy is not None else {}, step=0, params=params,
                                        tags={KIND_TAG: "teacher"}, data=data, bundle=bundle)
                record_datasets(tracking, [run_id], data, bundle)
            else:
                logged = tracking.log_model(run_id, [path], registered, params=params, tags={KIND_TAG: "teacher"})
        uri = tracking.register_teacher(run_id, logged, registered, accuracy, tags=card, alias=alias)
        tags = {MODEL_URI_TAG: uri}
        if accuracy is not None:
            tags[TEACHER_ACC_TAG] = accuracy
        tracking.set_tags(run_id, tags)
    except BaseException:
        tracking.end_if_running(run_id, "FAILED")
        raise
    tracking.end_run(run_id, "FINISHED")
    return ImportedTeacher(uri, run_id, card)


def load_data_spec(path: str | Path) -> DataSpec:
    """The data a teacher is evaluated on: a YAML file that is a data section, or any spec that has one."""
    raw = read_yaml(path)
    if isinstance(raw.get("experiment"), dict):  # a sweep
        raw = raw["experiment"]
    if "data" in raw:
        raw = raw["data"]
    elif "dataset" not in raw:
        raise SpecError(f"{path}: neither a data spec (it has no 'dataset') nor a spec with a 'data' section")
    return validate(DataSpec, raw, source=f"{path}: data")
