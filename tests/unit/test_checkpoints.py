"""Checkpoint directories: complete ones load, damaged ones are named and skipped, never picked."""
import logging
import os

import pytest
import torch
from deitlab.core.checkpoints import BadCheckpoint, Storage, read_checkpoint, verify_checkpoint, write_checkpoint
from deitlab.errors import SpecError
from deitlab.spec.base import validate
from deitlab.spec.schema import RunSpec


def _state(epoch: int) -> dict:
    return {"epoch": epoch, "model": {"w": torch.full((64, 64), float(epoch))}, "history": [{"acc": 0.1 * epoch}]}


def _checkpoint(storage: Storage, run: str, name: str, epoch: int) -> str:
    directory = os.path.join(storage.path(run), name)
    os.makedirs(directory)
    write_checkpoint(directory, _state(epoch))
    return directory


def test_round_trip_and_every_kind_of_damage(tmp_path):
    write_checkpoint(tmp_path, _state(3))
    assert verify_checkpoint(tmp_path)["epoch"] == 3
    assert torch.equal(read_checkpoint(tmp_path)["model"]["w"], torch.full((64, 64), 3.0))

    state = tmp_path / "state.pt"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadCheckpoint, match=rf"state.pt is truncated \({len(data) // 2} of {len(data)} bytes\)"):
        read_checkpoint(tmp_path)
    state.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(BadCheckpoint, match="does not match its checksum"):
        read_checkpoint(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(BadCheckpoint, match="no manifest"):
        read_checkpoint(tmp_path)


def test_latest_valid_takes_the_newest_epoch_and_warns_about_each_skipped_one(tmp_path, caplog):
    storage = Storage.open(str(tmp_path / "store"))
    _checkpoint(storage, "run", "checkpoint_2026-01-01_00-00-01.000000", 1)
    # best-k retention can leave an older epoch under a newer name: epochs decide, not names
    _checkpoint(storage, "run", "checkpoint_2026-01-01_00-00-09.000000", 2)
    newest = _checkpoint(storage, "run", "checkpoint_2026-01-01_00-00-03.000000", 3)
    half_written = os.path.join(storage.path("run"), "checkpoint_2026-01-01_00-00-04.000000")
    os.makedirs(half_written)
    torch.save(_state(4), os.path.join(half_written, "state.pt"))  # no manifest yet: an interrupted write

    state, path = storage.latest_valid("run")
    assert state["epoch"] == 3 and path == newest
    assert "checkpoint_2026-01-01_00-00-04.000000: no readable manifest.json" in caplog.text

    caplog.clear()
    with open(os.path.join(newest, "state.pt"), "r+b") as f:
        f.truncate(100)
    with caplog.at_level(logging.WARNING, logger="deitlab.checkpoints"):
        state, path = storage.latest_valid("run")
    assert state["epoch"] == 2
    assert f"skipping checkpoint {newest}: state.pt is truncated (100 of" in caplog.text
    assert storage.latest_valid("no-such-run") is None


def test_storage_uris_are_checked_in_one_line(tmp_path):
    with pytest.raises(SpecError, match="expected a local path or s3://bucket/prefix"):
        Storage.open("gs://bucket/x")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpecError, match=r"run.storage '.*file/sub'"):
        Storage.open(str(blocker / "sub"))
    with pytest.raises(SpecError, match="credentials do not belong in run.storage"):
        validate(RunSpec, {"storage": "s3://b/p?access_key=AKIA&secret_key=x"})
    with pytest.raises(SpecError, match="run: checkpoint_metric: unknown metric .accuracy."):
        validate(RunSpec, {"checkpoint_metric": "accuracy"}, source="run")
