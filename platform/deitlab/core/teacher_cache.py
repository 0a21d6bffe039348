"""The teacher-logit cache: a frozen teacher's logits for every batch of a run, written once, read by any later run,
pack, retry, resume or extension whose batches are the same. torch + pyarrow only.

Augmentation is deterministic per (seed, rank, epoch) (engine.Engine._seed_epoch), so the batches a run sees — and
the teacher's outputs on them — are known from its settings. The cache key hashes everything that shapes a batch or
the teacher's answer: the teacher's weights, the data's fingerprint, the data settings (augmentation, mixup/cutmix,
repeated augmentation, batch size, image size), world size, seed, the device kind and the teacher's dtype, and how
logits are stored. Under `STORAGE/teacher_cache/KEY/`:

    key.json                    what the key was made of (teacher, data, layout): `deitlab teacher cache list`
    train-e0003-r0.pt / .json   epoch 3 of rank 0: the logits of every batch, then (written last) its manifest
    val-r0.pt / .json           the validation split (the same every epoch)
    used.json                   when a run last read from it

A file is trusted only through its manifest (format, size, SHA-256, the number of batches): a missing manifest is a
file still being written; a file that does not match it is skipped with a warning naming it, and that pass runs the
teacher live. Before trusting a cached pass, the first batch is recomputed by the teacher and compared: a mismatch
is a warning and a live pass, never a wrong result.

Layouts: `full` keeps every logit (fp32: a cached run equals a live one bit for bit); `topK` keeps the K largest
logits (fp16) with their indices and each row's log-sum-exp, and gives the remaining probability mass evenly to the
other classes (FKD's rule) when the logits are rebuilt.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deitlab import __version__
from deitlab.core.checkpoints import Storage
from deitlab.core.step import teacher_logits

log = logging.getLogger("deitlab.teacher_cache")

FORMAT = "deitlab.teacher-cache/1"
CACHE_DIR = "teacher_cache"
KEY_FILE, USED_FILE = "key.json", "used.json"
FULL_UP_TO_CLASSES = 100  # layout "auto": full logits up to this many classes, top-k beyond


# ------------------------------------------------------------------------------------------------------ the key
def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's state: every tensor's name, dtype, shape and bytes, in name order (the teacher's identity,
    whatever file or hub it came from)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def layout(settings, num_classes: int) -> str:
    """How logits are stored: 'full', or 'topK' (K = settings.topk, below the class count)."""
    if settings.logits == "full" or (settings.logits == "auto" and num_classes <= FULL_UP_TO_CLASSES):
        return "full"
    return f"top{min(settings.topk, num_classes - 1)}"


def teacher_dtype(device_type: str, amp: bool) -> str:
    """The dtype the teacher computes in (step.prepare_teacher): bf16 weights on CUDA with amp, else fp32."""
    return "bfloat16" if device_type == "cuda" and amp else "float32"


@dataclass(frozen=True)
class CacheKey:
    key: str
    facts: dict[str, Any]  # what it was made of, as key.json records it


def cache_key(spec, *, weights_sha: str, fingerprint: str, num_classes: int, world_size: int,
              device_type: str) -> CacheKey:
    """The key of an ExperimentSpec's teacher logits (a pack shares it: pack_key covers every field used here)."""
    data = spec.data.model_dump(mode="json", exclude={"path", "num_workers"})  # the fingerprint stands for the files
    shape = layout(spec.run.teacher_cache, num_classes)
    made_of = {"format": FORMAT, "teacher_weights_sha256": weights_sha, "data_fingerprint": fingerprint, "data": data,
               "world_size": world_size, "seed": spec.run.seed, "device": device_type,
               "teacher_dtype": teacher_dtype(device_type, spec.run.amp), "layout": shape}
    key = hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:20]
    teacher = spec.teacher
    facts = {**made_of, "key": key, "teacher": teacher.label if teacher else None,
             "dataset": spec.data.dataset, "num_classes": num_classes}
    return CacheKey(key, facts)


def bytes_per_row(shape: str, num_classes: int) -> int:
    """Storage per image: fp32 logits (full); fp16 values + int16/int32 indices + an fp32 log-sum-exp (top-k)."""
    if shape == "full":
        return 4 * num_classes
    k = int(shape[3:])
    return k * (2 + (2 if num_classes <= 32767 else 4)) + 4


# ------------------------------------------------------------------------------------------------- the layouts
def pack_rows(logits: torch.Tensor, shape: str) -> dict[str, torch.Tensor]:
    """One batch's fp32 logits as stored (on the CPU)."""
    logits = logits.detach().float()
    if shape == "full":
        return {"values": logits.to("cpu", copy=True)}
    values, indices = logits.topk(int(shape[3:]), dim=-1)
    index_dtype = torch.int16 if logits.shape[-1] <= 32767 else torch.int32
    return {"values": values.half().cpu(), "indices": indices.to(index_dtype).cpu(),
            "lse": torch.logsumexp(logits, dim=-1).cpu()}


def unpack_rows(rows: dict[str, torch.Tensor], num_classes: int, device: torch.device) -> torch.Tensor:
    """fp32 logits again: exact for 'full'; for top-k, log-probabilities with the rest of the mass spread evenly."""
    values = rows["values"].to(device)
    if "indices" not in rows:
        return values.float()
    indices, lse = rows["indices"].to(device).long(), rows["lse"].to(device).float()
    top = values.float() - lse[:, None]  # log p of the top-k classes
    k = indices.shape[1]
    rest = (1 - top.exp().sum(dim=1)).clamp_min(1e-8) / max(num_classes - k, 1)
    logits = rest.log()[:, None].expand(-1, num_classes).clone()
    return logits.scatter_(1, indices, top)


def _close_enough(live: torch.Tensor, cached: dict[str, torch.Tensor], shape: str, tolerance: float) -> float | None:
    """The largest difference between the teacher's logits now and the cached ones (on the cached top-k classes for
    top-k), or None when it is within `tolerance` of the logits' scale."""
    live = live.float().cpu()
    if shape == "full":
        diff = (live - cached["values"]).abs().max().item() if live.shape == cached["values"].shape else float("inf")
    elif live.shape[0] != cached["values"].shape[0]:
        diff = float("inf")
    else:
        diff = (live.gather(1, cached["indices"].long()) - cached["values"].float()).abs().max().item()
    scale = 1.0 + live.abs().max().item()
    return None if diff <= tolerance * scale else diff


# ------------------------------------------------------------------------------------------------------ storage
@dataclass
class CacheStats:
    """What one run's teacher did: batches whose logits came from the cache, were written to it, or were computed
    live (written ones included); live checks of cached passes."""

    read: int = 0
    written: int = 0
    live: int = 0
    checked: int = 0

    def summary(self) -> str:
        total = self.read + self.live
        if not total:
            return "unused"
        parts = [f"read {self.read}" if self.read else "", f"written {self.written}" if self.written else ""]
        done = ", ".join(p for p in parts if p) or "neither read nor written"
        return f"{done} of {total} batches"

    def as_dict(self) -> dict[str, int]:
        return {"read": self.read, "written": self.written, "live": self.live, "checked": self.checked}


class CacheFileError(Exception):
    """A cache file that must not be used (no manifest, another format, truncated, corrupt)."""

    def __init__(self, message: str, *, foreign: bool = False):
        super().__init__(message)
        self.foreign = foreign  # another deitlab's format: left as it is


def pass_name(split: str, epoch: int | None, rank: int) -> str:
    return f"train-e{epoch:04d}-r{rank}" if split == "train" else f"val-r{rank}"


def _read_bytes(storage: Storage, path: str) -> bytes:
    with storage.filesystem.open_input_stream(path) as f:
        return f.read()


def _write_bytes(storage: Storage, path: str, payload: bytes) -> None:
    """Write whole or not at all: to a temporary name, then moved (a rename locally; S3 objects appear whole)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with storage.filesystem.open_output_stream(tmp) as f:
        f.write(payload)
    storage.filesystem.move(tmp, path)


def read_manifest(storage: Storage, path: str) -> dict[str, Any]:
    try:
        manifest = json.loads(_read_bytes(storage, path))
    except FileNotFoundError:
        raise CacheFileError("no manifest (still being written?)") from None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CacheFileError(f"unreadable manifest ({type(err).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CacheFileError(f"written in format {found!r} by deitlab {manifest.get('deitlab', '?')}"
                             if isinstance(manifest, dict) else "not a deitlab cache manifest",
                             foreign=isinstance(found, str) and found.startswith("deitlab.teacher-cache/"))
    return manifest


class TeacherCache:
    """One key's folder, as one rank of one run uses it."""

    def __init__(self, storage: Storage, key: CacheKey, *, rank: int, num_classes: int, verify: bool = True):
        self.storage, self.key, self.rank, self.num_classes, self.verify = storage, key, rank, num_classes, verify
        self.folder = storage.path(CACHE_DIR, key.key)
        self.shape = key.facts["layout"]
        self.tolerance = 3e-2 if key.facts["teacher_dtype"] != "float32" else (1e-4 if self.shape == "full" else 2e-3)
        self._touched = False

    def display(self, name: str) -> str:
        return self.storage.display(f"{self.folder}/{name}")

    def read(self, split: str, epoch: int | None, steps: int) -> tuple[list[dict[str, torch.Tensor]] | None, bool]:
        """(the cached batches of one pass, or None; whether the pass may be written). A file that cannot be used is
        a warning naming it; another format's file is left alone (not overwritten)."""
        name = pass_name(split, epoch, self.rank)
        try:
            manifest = read_manifest(self.storage, f"{self.folder}/{name}.json")
            if manifest.get("steps") != steps or manifest.get("layout") != self.shape:
                raise CacheFileError(f"holds {manifest.get('steps')} {manifest.get('layout')} batches, this pass has"
                                     f" {steps} {self.shape}")
            try:
                payload = _read_bytes(self.storage, f"{self.folder}/{name}.pt")
            except FileNotFoundError:
                raise CacheFileError("its .pt file is missing") from None
            if len(payload) != manifest["bytes"]:
                raise CacheFileError(f"truncated ({len(payload)} of {manifest['bytes']} bytes)")
            if hashlib.sha256(payload).hexdigest() != manifest["sha256"]:
                raise CacheFileError("does not match its checksum")
            try:
                batches = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)["batches"]
            except Exception as err:  # matches its manifest yet does not load
                raise CacheFileError(f"does not load ({type(err).__name__})") from None
        except CacheFileError as err:
            if str(err).startswith("no manifest"):
                return None, True  # not cached yet: the common case, no warning
            log.warning("teacher cache: skipping %s: %s; this pass runs the teacher live%s", self.display(f"{name}.pt"),
                        err, " and leaves the file as it is" if err.foreign else "")
            return None, not err.foreign
        self._touch()
        return batches, True

    def write(self, split: str, epoch: int | None, batches: list[dict[str, torch.Tensor]]) -> bool:
        """One pass's batches, then its manifest; a failure to write is a warning (the run goes on)."""
        name = pass_name(split, epoch, self.rank)
        try:
            if not self.storage.filesystem.get_file_info(f"{self.folder}/{KEY_FILE}").is_file:
                self.storage.filesystem.create_dir(self.folder, recursive=True)
                _write_bytes(self.storage, f"{self.folder}/{KEY_FILE}",
                             json.dumps({**self.key.facts, "created": _now()}, indent=1).encode())
            buffer = io.BytesIO()
            torch.save({"batches": batches}, buffer)
            payload = buffer.getvalue()
            _write_bytes(self.storage, f"{self.folder}/{name}.pt", payload)
            manifest = {"format": FORMAT, "deitlab": __version__, "split": split, "epoch": epoch, "rank": self.rank,
                        "steps": len(batches), "rows": sum(int(b["values"].shape[0]) for b in batches),
                        "layout": self.shape, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                        "written": _now()}
            _write_bytes(self.storage, f"{self.folder}/{name}.json", json.dumps(manifest, indent=1).encode())
        except OSError as err:
            log.warning("teacher cache: could not write %s (%s); the run goes on", self.display(f"{name}.pt"), err)
            return False
        return True

    def _touch(self) -> None:
        """Record when the key was last read (once per run)."""
        if self._touched:
            return
        self._touched = True
        try:
            _write_bytes(self.storage, f"{self.folder}/{USED_FILE}", json.dumps({"last_used": _now()}).encode())
        except OSError:
            pass  # a read-only cache still serves


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ----------------------------------------------------------------------------------------------- one pass's feed
@dataclass
class TeacherFeed:
    """The teacher's logits for the batches of one pass over a split, in order: read from the cache when it holds
    the pass (its first batch checked against the teacher), else computed by the teacher and, when the pass is
    complete, written to the cache."""

    teacher: nn.Module
    cache: TeacherCache | None
    split: str
    epoch: int | None
    steps: int
    stats: CacheStats
    _cached: list | None = None
    _record: list | None = None
    _index: int = 0

    def __post_init__(self):
        if self.cache is not None:
            self._cached, writable = self.cache.read(self.split, self.epoch, self.steps)
            self._record = [] if self._cached is None and writable else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        index, self._index = self._index, self._index + 1
        if self._cached is not None and index == 0 and self.cache.verify:
            live = teacher_logits(self.teacher, images)
            self.stats.checked += 1
            diff = _close_enough(live, self._cached[0], self.cache.shape, self.cache.tolerance)
            if diff is not None:
                log.warning("teacher cache: %s differs from the teacher on its first batch (largest difference %.3g);"
                            " this pass runs the teacher live", self.cache.display(
                                f"{pass_name(self.split, self.epoch, self.cache.rank)}.pt"), diff)
                self._cached = None
                return self._live(images, live)
        if self._cached is not None and index < len(self._cached):
            self.stats.read += 1
            return unpack_rows(self._cached[index], self.cache.num_classes, images.device)
        return self._live(images)

    def _live(self, images: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's logits on this batch, recorded for the cache; in a top-k layout, rebuilt from the rows kept,
        so that students learn the same from a pass that was written as from one that was read."""
        logits = teacher_logits(self.teacher, images) if logits is None else logits
        self.stats.live += 1
        if self.cache is None or (self.cache.shape == "full" and self._record is None):
            return logits
        rows = pack_rows(logits, self.cache.shape)
        if self._record is not None:
            self._record.append(rows)
        return logits if self.cache.shape == "full" else unpack_rows(rows, self.cache.num_classes, logits.device)

    def finish(self) -> None:
        """The pass ended: write what was recorded, when it covers every batch."""
        complete = self._record is not None and len(self._record) == self.steps == self._index
        if complete and self.cache.write(self.split, self.epoch, self._record):
            self.stats.written += self.steps
        self._record = None


# ------------------------------------------------------------------------------------------------- management
@dataclass(frozen=True)
class CacheEntry:
    key: str
    facts: dict[str, Any]
    epochs: list[int]  # training epochs complete on every rank
    val: bool
    bytes: int
    last_used: str | None
    foreign: str | None = None  # another format's folder: why it is not read


def list_caches(storage: Storage) -> list[CacheEntry]:
    """Every key under STORAGE/teacher_cache, oldest use first."""
    import pyarrow.fs as pafs

    root = storage.path(CACHE_DIR)
    infos = storage.filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True))
    folders: dict[str, list] = {}
    for info in infos:
        relative = info.path[len(root) + 1:] if info.path.startswith(root + "/") else info.path
        if info.type == pafs.FileType.File and "/" in relative:
            folders.setdefault(relative.split("/", 1)[0], []).append(info)
    entries = []
    for key, files in sorted(folders.items()):
        names = {f.base_name: f for f in files}
        facts: dict[str, Any] = {}
        foreign = None
        try:
            facts = json.loads(_read_bytes(storage, f"{root}/{key}/{KEY_FILE}"))
            if facts.get("format") != FORMAT:
                foreign = f"format {facts.get('format')!r}"
        except (OSError, ValueError, UnicodeDecodeError):
            foreign = "no readable key.json"
        world = int(facts.get("world_size") or 1)
        epochs: dict[int, set[int]] = {}
        for name in names:
            if name.startswith("train-e") and name.endswith(".json"):
                epoch, rank = name[7:-5].split("-r")
                if f"{name[:-5]}.pt" in names:
                    epochs.setdefault(int(epoch), set()).add(int(rank))
        used = None
        if USED_FILE in names:
            try:
                used = json.loads(_read_bytes(storage, f"{root}/{key}/{USED_FILE}")).get("last_used")
            except (OSError, ValueError):
                used = None
        entries.append(CacheEntry(key, facts, sorted(e for e, ranks in epochs.items() if len(ranks) >= world),
                                  any(n.startswith("val-r") and n.endswith(".json") for n in names),
                                  sum(f.size or 0 for f in files), used or facts.get("created"), foreign))
    return sorted(entries, key=lambda e: e.last_used or "")


def remove_cache(storage: Storage, key: str) -> None:
    storage.filesystem.delete_dir(storage.path(CACHE_DIR, key))
