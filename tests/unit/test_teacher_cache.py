"""The teacher-logit cache: a run that reads it equals the live run bit for bit (through a resume), a damaged,
foreign or mismatching file is skipped with a warning and the pass runs live, the key tells batches apart, top-k
rebuilds FKD's distribution."""
import json
import logging
import math

import pytest
import timm
import torch
from deitlab.core.checkpoints import Storage, read_checkpoint, write_checkpoint
from deitlab.core.engine import experiment_engine
from deitlab.core.models import save_model
from deitlab.core.teacher_cache import (
    CACHE_DIR,
    cache_key,
    list_caches,
    pack_rows,
    remove_cache,
    unpack_rows,
)
from deitlab.spec.base import validate
from deitlab.spec.schema import ExperimentSpec

CPU = torch.device("cpu")
TIMING = {"epoch_time_s", "epoch_wall_s", "train_images_per_s"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=3)
    return save_model(tmp_path_factory.mktemp("teacher") / "teacher.pt", model, arch="test_resnet", model_kwargs={},
                      num_classes=10, in_chans=3)


def _spec(teacher, **overrides):
    raw = {"student": {"patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 1, "drop_path_rate": 0.1},
           "teacher": {"checkpoint": str(teacher)}, "distillation": {"mode": "soft", "tau": 3.0},
           "optim": {"epochs": 3, "warmup_epochs": 0},
           "data": {"dataset": "synthetic", "synthetic_size": 96, "img_size": 8, "batch_size": 16,
                    "augment": {"mixup": 0.8, "cutmix": 1.0, "random_erasing": 0.25, "hflip": True}}}
    return validate(ExperimentSpec, raw).with_overrides(overrides)


def _values(history):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in history]


def _run(spec, teacher, store, epochs=3):
    engine = experiment_engine(spec, str(teacher), device=CPU, cache_storage=str(store) if store else None)
    return engine, _values(engine.run(epochs))


def _folder(store):
    (folder,) = (store / CACHE_DIR).iterdir()
    return folder


def test_a_run_reading_the_cache_equals_the_live_run_bit_for_bit_through_a_resume(teacher, tmp_path):
    spec = _spec(teacher)
    _, live = _run(spec, teacher, None)  # no cache at all
    writer, written = _run(spec, teacher, tmp_path)
    assert written == live
    per_epoch = len(writer.train_loader)
    assert len(writer.val_loader) == 1
    assert writer.teacher_stats.read == 2  # epochs 2 and 3 evaluate with the validation logits epoch 1 wrote
    assert writer.teacher_stats.written == writer.teacher_stats.live == 3 * per_epoch + 1  # + the validation batch
    files = sorted(p.name for p in _folder(tmp_path).iterdir())
    assert files == ["key.json", "train-e0000-r0.json", "train-e0000-r0.pt", "train-e0001-r0.json",
                     "train-e0001-r0.pt", "train-e0002-r0.json", "train-e0002-r0.pt", "used.json", "val-r0.json",
                     "val-r0.pt"]

    reader, read = _run(spec, teacher, tmp_path)
    assert read == live  # every metric of every epoch, exactly
    stats = reader.teacher_stats
    assert (stats.live, stats.written, stats.read) == (0, 0, 3 * per_epoch + 3)
    assert stats.checked == 6  # the first batch of each cached pass: 3 training epochs + 3 evaluations
    assert stats.summary() == f"read {3 * per_epoch + 3} of {3 * per_epoch + 3} batches"

    interrupted = experiment_engine(spec, str(teacher), device=CPU, cache_storage=str(tmp_path))
    list(interrupted.run(1))
    (tmp_path / "ckpt").mkdir()
    write_checkpoint(tmp_path / "ckpt", interrupted.state_dict())
    resumed = experiment_engine(spec, str(teacher), device=CPU, cache_storage=str(tmp_path))
    resumed.load_state_dict(read_checkpoint(tmp_path / "ckpt"))
    assert _values(resumed.run(3)) == live[1:] and _values(resumed.history) == live
    assert resumed.teacher_stats.read == 3 * per_epoch + 3 and resumed.teacher_stats.live == 0  # counts carried over


def test_a_damaged_or_foreign_file_is_skipped_with_a_warning_and_the_pass_runs_live(teacher, tmp_path, caplog):
    spec = _spec(teacher)
    _, live = _run(spec, teacher, tmp_path)
    folder = _folder(tmp_path)
    truncated = folder / "train-e0001-r0.pt"
    truncated.write_bytes(truncated.read_bytes()[:100])
    foreign = folder / "train-e0002-r0.json"
    manifest = json.loads(foreign.read_text())
    foreign.write_text(json.dumps({**manifest, "format": "deitlab.teacher-cache/0", "deitlab": "0.0.1"}))
    kept = foreign.read_bytes()

    with caplog.at_level(logging.WARNING, logger="deitlab.teacher_cache"):
        engine, again = _run(spec, teacher, tmp_path)
    assert again == live
    warnings = [r.getMessage() for r in caplog.records]
    assert any(f"skipping {truncated}: truncated (100 of" in w and "runs the teacher live" in w for w in warnings)
    assert any(f"skipping {folder / 'train-e0002-r0.pt'}: written in format 'deitlab.teacher-cache/0' by deitlab"
               " 0.0.1" in w and "leaves the file as it is" in w for w in warnings), warnings
    per_epoch = len(engine.train_loader)
    assert engine.teacher_stats.live == 2 * per_epoch  # epochs 1 and 2
    assert engine.teacher_stats.written == per_epoch  # epoch 1 rewritten, epoch 2 left as it was
    assert foreign.read_bytes() == kept
    assert (folder / "train-e0001-r0.pt").stat().st_size > 100  # repaired: the next run reads it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deitlab.teacher_cache"):
        engine, third = _run(spec, teacher, tmp_path)
    assert third == live and engine.teacher_stats.live == per_epoch  # only the foreign epoch runs live now


def test_cached_logits_that_differ_from_the_teacher_are_not_trusted(teacher, tmp_path, caplog):
    spec = _spec(teacher)
    _, live = _run(spec, teacher, tmp_path)
    folder = _folder(tmp_path)
    path = folder / "train-e0000-r0.pt"
    batches = torch.load(path, weights_only=True)["batches"]
    for batch in batches:
        batch["values"] += 0.5  # what a teacher changed in place (or another one under the same key) would give
    import hashlib
    import io

    buffer = io.BytesIO()
    torch.save({"batches": batches}, buffer)
    path.write_bytes(buffer.getvalue())
    manifest_path = folder / "train-e0000-r0.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(bytes=len(buffer.getvalue()), sha256=hashlib.sha256(buffer.getvalue()).hexdigest())
    manifest_path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="deitlab.teacher_cache"):
        engine, again = _run(spec, teacher, tmp_path)
    assert again == live  # never a wrong result
    assert any(f"{path} differs from the teacher on its first batch (largest difference 0.5" in r.getMessage()
               for r in caplog.records)
    assert engine.teacher_stats.live == len(engine.train_loader)  # that epoch, live


def test_the_key_covers_what_shapes_a_batch_and_nothing_else(teacher):
    spec = _spec(teacher)

    def key(s, world_size=1, device="cpu", weights="w", fingerprint="f"):
        return cache_key(s, weights_sha=weights, fingerprint=fingerprint, num_classes=10, world_size=world_size,
                         device_type=device).key

    base = key(spec)
    for changed in ({"run.seed": 1}, {"data.batch_size": 8}, {"data.augment.mixup": 0.2}, {"data.img_size": 16},
                    {"data.repeated_aug": 2}, {"run.teacher_cache.logits": "topk"}):
        assert key(spec.with_overrides(changed)) != base, changed
    assert key(spec, world_size=2) != base and key(spec, weights="v") != base and key(spec, fingerprint="g") != base
    assert key(spec.with_overrides({"run.amp": False}), device="cuda") != key(spec, device="cuda")  # bf16 vs fp32
    for same in ({"distillation.tau": 1.0}, {"distillation.mode": "hard"}, {"optim.lr": 1e-4},
                 {"student.embed_dim": 32}, {"data.num_workers": 2}, {"optim.epochs": 9}, {"run.amp": False}):
        assert key(spec.with_overrides(same)) == base, same  # amp: ignored on CPU


def test_top_k_keeps_the_largest_logits_and_spreads_the_rest_evenly():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    rows = pack_rows(logits, "top2")
    assert rows["indices"].tolist() == [[0, 1]] and rows["values"].dtype == torch.float16
    rebuilt = unpack_rows(rows, 5, CPU).softmax(-1)
    p = logits.softmax(-1)[0].tolist()
    rest = (1 - p[0] - p[1]) / 3
    assert rebuilt[0].tolist() == pytest.approx([p[0], p[1], rest, rest, rest], abs=1e-6)
    assert math.isclose(rebuilt.sum().item(), 1.0, rel_tol=1e-6)
    full = pack_rows(logits, "full")
    assert torch.equal(unpack_rows(full, 5, CPU), logits)


def test_list_and_remove(teacher, tmp_path):
    spec = _spec(teacher, **{"optim.epochs": 2})
    _run(spec, teacher, tmp_path, epochs=2)
    _run(spec.with_overrides({"run.seed": 3}), teacher, tmp_path, epochs=1)
    storage = Storage.open(str(tmp_path), create=False)
    entries = {e.facts["seed"]: e for e in list_caches(storage)}
    assert entries[0].epochs == [0, 1] and entries[3].epochs == [0] and entries[0].val
    assert entries[0].facts["teacher"] == "teacher" and entries[0].facts["layout"] == "full"
    on_disk = sum(p.stat().st_size for p in (tmp_path / CACHE_DIR / entries[0].key).iterdir())
    assert entries[0].bytes == on_disk
    remove_cache(storage, entries[0].key)
    assert [e.key for e in list_caches(storage)] == [entries[3].key]


def test_the_cache_lives_in_s3_as_well(teacher, s3_endpoint):
    from conftest import s3_client

    s3_client(s3_endpoint).create_bucket(Bucket="teacher-cache")
    uri = f"s3://teacher-cache/shared?endpoint_override={s3_endpoint}&scheme=http"
    spec = _spec(teacher, **{"optim.epochs": 2})
    writer, written = _run(spec, teacher, uri, epochs=2)
    reader, read = _run(spec, teacher, uri, epochs=2)
    assert read == written and reader.teacher_stats.live == 0 and writer.teacher_stats.written > 0
    (entry,) = list_caches(Storage.open(uri, create=False))
    assert entry.epochs == [0, 1] and entry.val and entry.bytes > 0
