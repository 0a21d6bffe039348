"""What MLflow knows of a run's inputs and outputs: its training and validation data as MLflow datasets, and its model
(a trained or imported teacher, a student's best weights) as an MLflow logged model linked to the run, its metrics
and the data they were measured on. The MLflow UI's Dataset and Models columns, "group by dataset" and the registry's
model pages read them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from deitlab.errors import one_line
from deitlab.tracking.store import DatasetRecord, LoggedModelRecord, Tracking

log = logging.getLogger("deitlab.tracking")


BEST_MODEL = "best_model"  # a student's logged model; a teacher's is named as its registered model


TEACHER_MODEL_PARAMS = ("architecture", "family", "params_m", "gflops", "img_size", "num_classes")  # from its card


def dataset_records(data, bundle) -> list[DatasetRecord]:
    """The train and eval datasets of a data spec as loaded: named after the data set (or its folder), each split's
    fingerprint as digest, its path or URI as source (none for the built-in sets)."""
    from deitlab.data.loaders import split_fingerprints

    base = Path(data.path.rstrip("/")).name if data.path else data.dataset
    digests = split_fingerprints(bundle)
    sizes = bundle.sizes
    return [DatasetRecord(f"{base}/{split}", digest, context, data.path,
                          {"num_rows": rows, "num_classes": bundle.num_classes, "img_size": bundle.img_size,
                           "kind": data.dataset})
            for split, context, digest, rows in zip(("train", "val"), ("train", "eval"), digests, sizes)]


def record_datasets(tracking: Tracking, run_ids: list[str], data, bundle) -> list[DatasetRecord]:
    """Log the data's datasets as inputs of each run (a warning, never a failed run, when MLflow refuses)."""
    records = dataset_records(data, bundle)
    for run_id in run_ids:
        try:
            tracking.log_datasets(run_id, records)
        except Exception as err:
            log.warning("MLflow datasets of run %s not recorded (%s)", run_id, one_line(err, 200))
    return records


def log_model_file(tracking: Tracking, run_id: str, path: Path, name: str, *, metrics: dict[str, float],
                   step: int, params: dict[str, Any], tags: dict[str, Any], data, bundle) -> LoggedModelRecord:
    """The deitlab model file at `path` as the run's logged model `name`; `metrics` are linked to it and to the
    validation data they were measured on."""
    evaluated = dataset_records(data, bundle)[1]
    return tracking.log_model(run_id, [path], name, metrics=metrics, step=step, params=params, tags=tags,
                              dataset=evaluated)
