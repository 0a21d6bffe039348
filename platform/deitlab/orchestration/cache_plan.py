"""What the teacher-logit cache already holds for a sweep's packs, and about how much the sweep will write: the cache
columns of `deitlab sweep plan`. Teachers are loaded as the workers will load them (MLflow only read), to know
their weights' SHA-256, the first part of every key.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from deitlab.core.checkpoints import Storage
from deitlab.core.teacher_cache import (
    bytes_per_row,
    cache_key,
    list_caches,
    weights_sha256,
)
from deitlab.errors import SpecError, one_line
from deitlab.orchestration.teachers import resolve_teacher_file
from deitlab.tracking.store import Tracking
from deitlab.units import human_bytes


BATCH_RECORD_BYTES = 290  # what torch.save adds per stored batch (its tensors' zip entries), measured on digits


@dataclass(frozen=True)
class UnitCache:
    """One Ray Train run's (a pack's, or a trial's) teacher logits: its key, the epochs the cache holds of those it
    trains, and the bytes it will write. `note` says why nothing is known (a teacher not registered yet)."""

    key: str | None = None
    epochs: int = 0
    held: list[int] = field(default_factory=list)
    val_held: bool = False
    write_bytes: int = 0
    shared_with: str | None = None  # an earlier unit of the plan writes this key
    note: str = ""


def plan_cache(specs: dict, units: dict[str, list[str]]) -> dict[str, UnitCache]:
    """Per unit of the plan (unit name → member trial names) with a teacher and the cache on."""
    from deitlab.core.models import build_teacher
    from deitlab.data.loaders import data_fingerprint, load_data, make_loaders

    loaded: dict[str, tuple[str, object] | str] = {}  # teacher + data → (weights SHA-256, bundle), or why not
    writers: dict[str, str] = {}  # key → the first unit of the plan that writes it
    plans: dict[str, UnitCache] = {}
    for unit, members in units.items():
        spec = specs[members[0]]
        if spec.teacher is None or not spec.run.teacher_cache.enabled:
            continue
        ident = spec.teacher.model_dump_json() + spec.data.model_dump_json()
        if ident not in loaded:
            try:
                bundle = load_data(spec.data)
                path = resolve_teacher_file(spec.teacher, Tracking.reader(spec.run))
                model, _ = build_teacher(spec.teacher, path, bundle)
                loaded[ident] = (weights_sha256(model), bundle)
            except SpecError as err:
                loaded[ident] = f"teacher {spec.teacher.label} not loaded: {one_line(err, 240)}"
        if isinstance(loaded[ident], str):
            plans[unit] = UnitCache(note=loaded[ident])
            continue
        sha, bundle = loaded[ident]
        world = spec.run.workers
        key = cache_key(spec, weights_sha=sha, fingerprint=data_fingerprint(bundle), num_classes=bundle.num_classes,
                        world_size=world, device_type="cuda" if spec.run.gpus_per_worker > 0 else "cpu")
        try:
            entry = next((e for e in list_caches(Storage.open(spec.run.cache_storage, create=False,
                                                               what="run.teacher_cache.storage"))
                          if e.key == key.key and e.foreign is None), None)
        except (SpecError, OSError) as err:
            plans[unit] = UnitCache(key.key, note=f"cache not readable ({one_line(err, 120)})")
            continue
        epochs = spec.optim.epochs
        held = [e for e in (entry.epochs if entry else []) if e < epochs]
        val_held = bool(entry and entry.val)
        per_row = bytes_per_row(key.facts["layout"], bundle.num_classes)
        train_loader, val_loader = make_loaders(bundle, spec.data, rank=0, world_size=world, seed=spec.run.seed)
        # per epoch: the rows (at most: a last batch may be smaller) and torch.save's record of each batch's tensors
        train_bytes = len(train_loader) * (spec.data.batch_size * per_row + BATCH_RECORD_BYTES) * world
        needs_train = any(specs[m].distillation.spec_mode.needs_teacher for m in members)
        write = 0
        if key.key not in writers:
            writers[key.key] = unit
            write = (epochs - len(held)) * train_bytes if needs_train else 0
            write += 0 if val_held else bundle.sizes[1] * per_row + len(val_loader) * BATCH_RECORD_BYTES * world
        plans[unit] = UnitCache(key.key, epochs, held, val_held, write,
                                None if writers[key.key] == unit else writers[key.key])
    return plans


def cache_cell(plan: UnitCache | None) -> str:
    """The plan table's cell for one trial."""
    if plan is None:
        return "—"
    if plan.note:
        return plan.note
    held = f"{len(plan.held)}/{plan.epochs} epochs held"
    if plan.shared_with:
        return f"{plan.key[:8]}: {held}, the rest from {plan.shared_with}"
    return f"{plan.key[:8]}: {held}" + (f", writes ~{human_bytes(plan.write_bytes)}" if plan.write_bytes else "")
