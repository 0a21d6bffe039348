"""Packed data sets: an image folder as Parquet shards on a local disk or S3, read back in streamed batches of JPEG
bytes that gpu_augment.py decodes on the training device. torch, pyarrow and PIL only; torch is imported only where
batches are read, so packing and checking an image folder start quickly.

A pack at DEST (a folder, or s3://bucket/prefix with the endpoint as in checkpoints.Storage):

    DEST/train/part-00000.parquet …   columns image (JPEG bytes), label (int32), index (int64: position in the split),
    DEST/val/part-00000.parquet …             path (string: the source file, relative to SRC)
    DEST/meta.json                    written last — its presence marks a complete pack: format, classes, and per
                                      split the rows and each shard's rows, row-group sizes, bytes and SHA-256

Rows keep torchvision ImageFolder's order (classes sorted by folder name, files sorted within), so `index` and
`label` are what ImageFolder would give. Shards are cut into small row groups (DEFAULT_GROUP_ROWS) because a
row group is the smallest unit Parquet reads: a reader that wants one image reads its group.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
from collections import OrderedDict, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deitlab.core.checkpoints import Storage
from deitlab.data.batches import EncodedImages, ShardBatchSampler
from deitlab.errors import SpecError, one_line

if TYPE_CHECKING:
    import torch

FORMAT = "deitlab.pack/1"
META_FILE = "meta.json"
SPLITS = ("train", "val")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
DEFAULT_SHARD_ROWS = 2048  # ~230 MB of ImageNet-sized JPEGs per file
DEFAULT_GROUP_ROWS = 32  # rows per row group: what a reader fetches to get one of them
DEFAULT_CACHE_BYTES = 2 * 2**30  # row groups a reader keeps in memory, per split
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int32()), ("index", pa.int64()), ("path", pa.string())])
_PART = re.compile(r"part-\d{5}\.parquet")

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def check_pack_uri(uri: str, what: str) -> str:
    """A local path or s3://bucket/prefix[?endpoint_override=…] without credentials (they would end up in specs,
    MLflow params and messages: they belong in AWS_* variables or a profile). SpecError in one line otherwise."""
    if "://" in uri:
        if any(k in uri.lower() for k in ("access_key", "secret_key", "session_token", "@")):
            raise SpecError(f"{what}: credentials do not belong in the URI; set AWS_ACCESS_KEY_ID /"
                            " AWS_SECRET_ACCESS_KEY (or a profile) in the environment")
        if not uri.startswith(("s3://", "file://")):
            raise SpecError(f"{what} '{uri}': expected a local path or s3://bucket/prefix")
    return uri


# ---------------------------------------------------------------------------------------------------------- pack
def scan_imagefolder(src: str | Path, what: str | None = None) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """(classes, {split: [(path relative to src, label)]}) in ImageFolder's order; SpecError for a folder it would
    reject, or one whose train/ and val/ disagree on the classes. Messages start with `what` (default: pack source)."""
    what = what or f"pack source '{src}'"
    root = Path(src).expanduser()
    if not root.is_dir():
        raise SpecError(f"{what}: no such folder")
    found = {}
    for split in SPLITS:
        if not (root / split).is_dir():
            raise SpecError(f"{what}: no '{split}/' folder (expected train/ and val/, each with one"
                            " folder per class)")
        found[split] = sorted(e.name for e in os.scandir(root / split) if e.is_dir())
        if not found[split]:
            raise SpecError(f"{what}: '{split}/' has no class folders")
    if found["train"] != found["val"]:
        only_train = sorted(set(found["train"]) - set(found["val"]))
        only_val = sorted(set(found["val"]) - set(found["train"]))
        raise SpecError(f"{what}: train/ and val/ have different class folders (only in train:"
                        f" {', '.join(only_train) or 'none'}; only in val: {', '.join(only_val) or 'none'})")
    classes, samples, empty = found["train"], {}, []
    for split in SPLITS:
        samples[split] = []
        for label, name in enumerate(classes):
            before = len(samples[split])
            for folder, _, files in sorted(os.walk(root / split / name, followlinks=True)):
                for file in sorted(files):
                    if file.lower().endswith(IMG_EXTENSIONS):
                        samples[split].append((os.path.relpath(os.path.join(folder, file), root), label))
            if len(samples[split]) == before:
                empty.append(f"{split}/{name}")
    if empty:
        raise SpecError(f"{what}: class folder(s) without images: {', '.join(empty[:5])}"
                        + (f" and {len(empty) - 5} more" if len(empty) > 5 else ""))
    return classes, samples


def _inspect(path: Path) -> tuple[bool, str | None]:
    """(stored as is, error): every file must decode in full. JPEGs in RGB or grayscale are kept byte for byte."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            as_is = im.format == "JPEG" and im.mode in ("RGB", "L")
            if im.format == "JPEG":
                # decode at 1/8 scale: every byte is still entropy-decoded (truncation and corrupt data show) for a
                # fraction of the cost
                im.draft(im.mode, (1, 1))
            im.load()
        return as_is, None
    except Exception as err:  # PIL raises many types for bad files
        return False, one_line(err, 120)


def _check_images(root: Path, files: list[str], pool: ThreadPoolExecutor,
                  report: Progress) -> tuple[list[bool], list[str]]:
    """Decode every file (see _inspect): (stored as is, per file) and 'path (reason)' for each one that fails."""
    checked, bad = [], []
    for n, (as_is, error) in enumerate(pool.map(lambda f: _inspect(root / f), files), 1):
        checked.append(as_is)
        if error:
            bad.append(f"{files[n - 1]} ({error})")
        if n % 64 == 0 or n == len(files):
            report("checking images", n, len(files))
    return checked, bad


def check_imagefolder(src: str | Path, what: str, workers: int | None = None) -> int:
    """An image folder training can read to the end: its layout (as scan_imagefolder) and every image decoding, so
    a corrupt file fails before training starts rather than in a data loader hours in. Returns the number of images.
    JPEGs are decoded at 1/8 scale (see _inspect), on threads; a data pack is checked once, when it is packed.

    A folder that passed is remembered by a fingerprint of its files (paths, sizes, modification times) in the user's
    cache: the next run over the unchanged folder only lists and stats it (ImageNet's decode takes minutes)."""
    root = Path(src).expanduser().resolve()
    _, samples = scan_imagefolder(src, what)
    files = [path for split in SPLITS for path, _ in samples[split]]
    fingerprint = hashlib.sha256()
    for name in files:
        stat = (root / name).stat()
        fingerprint.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    passed = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deitlab" / "checked-imagefolders"
    marker = passed / f"{fingerprint.hexdigest()}.ok"
    if marker.is_file():
        return len(files)
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        _, bad = _check_images(root, files, pool, lambda stage, done, total: None)
    if bad:
        raise SpecError(f"{what}: {len(bad)} file(s) do not decode, e.g. {bad[0]}")
    try:
        passed.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{root}\n", encoding="utf-8")
    except OSError:  # a read-only home: the folder is checked again next time
        pass
    return len(files)


def check_readable(data) -> None:
    """Fail in one line, before training starts, on data (a DataSpec) a worker could not read to the end: an image
    folder with an image that does not decode (a truncated download, a web page saved as .jpg), a pack whose
    meta.json is missing or whose storage cannot be reached. Nothing is loaded into memory; digits and synthetic
    data pass. No torch: the CLI asks this before anything heavy is imported."""
    if data.dataset == "imagefolder":
        check_imagefolder(data.path, f"imagefolder '{data.path}'")
    elif data.dataset == "parquet":
        ParquetPack(data.path)  # reads meta.json only


def _encoded(path: Path, as_is: bool) -> bytes:
    """The bytes stored for a file: the JPEG itself, or the image converted to RGB (like ImageFolder's loader) and
    encoded as a JPEG of quality 95 without chroma subsampling."""
    data = path.read_bytes()
    if as_is:
        return data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        out = io.BytesIO()
        im.convert("RGB").save(out, "JPEG", quality=95, subsampling=0)  # 4:4:4: colour kept at full resolution
    return out.getvalue()


def _destination(dest: str, src: Path, overwrite: bool) -> Storage:
    """The pack's storage, checked without writing: reachable, not inside the source, not already a pack."""
    import pyarrow.fs as pafs

    check_pack_uri(dest, "pack destination")
    storage = Storage.probe(dest, what="pack destination")
    fs = storage.filesystem
    try:
        if not dest.startswith("s3://"):
            root = Path(storage.root)
            if root.exists() and not root.is_dir():
                raise SpecError(f"pack destination '{dest}': exists and is not a folder")
            if root == src or src in root.parents:
                raise SpecError(f"pack destination '{dest}': inside the source folder")
        packed = fs.get_file_info(storage.path(META_FILE)).type != pafs.FileType.NotFound
    except SpecError:
        raise
    except Exception as err:  # unreachable endpoint, denied
        raise SpecError(f"pack destination '{dest}': {one_line(err)}") from None
    if packed and not overwrite:
        raise SpecError(f"pack destination '{dest}' already holds a pack (meta.json); pass --overwrite to replace it")
    return storage


def _clear(storage: Storage) -> None:
    """Remove a previous pack's meta.json (first: the old pack is incomplete from here on) and its shard files."""
    import pyarrow.fs as pafs

    fs = storage.filesystem
    if fs.get_file_info(storage.path(META_FILE)).type == pafs.FileType.File:
        fs.delete_file(storage.path(META_FILE))
    for split in SPLITS:
        for info in fs.get_file_info(pafs.FileSelector(storage.path(split), allow_not_found=True)):
            if info.type == pafs.FileType.File and _PART.fullmatch(info.base_name):
                fs.delete_file(info.path)


def _write_split(storage: Storage, split: str, rows: list[tuple[str, int, bool]], src: Path, shard_rows: int,
                 group_rows: int, pool: ThreadPoolExecutor, report: Callable[[int], None]) -> list[dict]:
    """Write one split's shards; each is built in memory (for its checksum) and then written in one stream."""
    import pyarrow.fs as pafs

    if isinstance(storage.filesystem, pafs.LocalFileSystem):  # S3 needs no folders (pyarrow would add marker objects)
        storage.filesystem.create_dir(storage.path(split), recursive=True)
    shards = []
    for number, first in enumerate(range(0, len(rows), shard_rows)):
        part = rows[first: first + shard_rows]
        images = list(pool.map(lambda row: _encoded(src / row[0], row[2]), part))
        sink, groups = pa.BufferOutputStream(), []
        # JPEG bytes do not compress: only the small columns are compressed; no statistics or dictionary for images
        with pq.ParquetWriter(sink, SCHEMA, compression={"image": "NONE", "label": "ZSTD", "index": "ZSTD",
                                                         "path": "ZSTD"},
                              use_dictionary=False, write_statistics=["label", "index"]) as writer:
            for start in range(0, len(part), group_rows):
                stop = min(start + group_rows, len(part))
                writer.write_table(pa.table({
                    "image": pa.array(images[start:stop], pa.binary()),
                    "label": pa.array([row[1] for row in part[start:stop]], pa.int32()),
                    "index": pa.array(range(first + start, first + stop), pa.int64()),
                    "path": pa.array([row[0] for row in part[start:stop]], pa.string())}, schema=SCHEMA),
                    row_group_size=stop - start)
                groups.append(stop - start)
        buffer = sink.getvalue()
        name = f"{split}/part-{number:05d}.parquet"
        with storage.filesystem.open_output_stream(storage.path(name)) as f:
            f.write(buffer)
        shards.append({"file": name, "rows": len(part), "row_groups": groups, "bytes": buffer.size,
                       "sha256": hashlib.sha256(buffer).hexdigest()})
        report(len(part))
    return shards


def pack_imagefolder(src: str | Path, dest: str, *, shard_rows: int = DEFAULT_SHARD_ROWS,
                     group_rows: int = DEFAULT_GROUP_ROWS, overwrite: bool = False,
                     progress: Progress | None = None, workers: int | None = None) -> dict:
    """Pack SRC/train and SRC/val (ImageFolder layout) into Parquet shards at DEST; meta.json is written last.

    JPEG files (RGB or grayscale) are stored byte for byte. Every other file — PNG, BMP, TIFF, WebP, CMYK JPEGs — is
    converted to RGB (as ImageFolder's loader does) and re-encoded by PIL as a JPEG of quality 95 (4:4:4), so those
    images change slightly. Everything is checked before anything is written, and refused with a one-line SpecError: a
    missing or malformed SRC, train/ and val/ with different classes, empty class folders, any file that does not
    decode, a DEST with credentials in its URI, or a DEST that already holds a pack (unless `overwrite`).
    Returns what was written: classes, and per split rows, shards and bytes.
    """
    if shard_rows < 1 or group_rows < 1:
        raise SpecError(f"--shard-rows and row groups must be at least 1 (got {shard_rows}, {group_rows})")
    check_pack_uri(dest, "pack destination")
    report = progress or (lambda stage, done, total: None)
    root = Path(src).expanduser().resolve()
    classes, samples = scan_imagefolder(src)
    storage = _destination(dest, root, overwrite)
    files = [(split, path) for split in SPLITS for path, _ in samples[split]]
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        checked, bad = _check_images(root, [path for _, path in files], pool, report)
        if bad:
            raise SpecError(f"pack source '{src}': {len(bad)} file(s) do not decode, e.g. {bad[0]}")
        try:
            _clear(storage)
            meta = {"format": FORMAT, "classes": classes, "group_rows": group_rows, "splits": {}}
            flags = iter(checked)
            for split in SPLITS:
                rows = [(path, label, next(flags)) for path, label in samples[split]]
                done = [0]

                def step(n: int, split=split, rows=rows, done=done) -> None:
                    done[0] += n
                    report(f"writing {split}", done[0], len(rows))

                meta["splits"][split] = {"rows": len(rows), "shards": _write_split(
                    storage, split, rows, root, shard_rows, group_rows, pool, step)}
            with storage.filesystem.open_output_stream(storage.path(META_FILE)) as f:
                f.write(json.dumps(meta, indent=1).encode())
        except OSError as err:  # S3 refused a write, disk full: the pack stays incomplete (no meta.json)
            raise SpecError(f"pack destination '{dest}': {one_line(err)}") from None
    return {"dest": dest, "classes": len(classes), "reencoded": checked.count(False),
            "splits": {split: {"rows": m["rows"], "shards": len(m["shards"]),
                               "bytes": sum(s["bytes"] for s in m["shards"])}
                       for split, m in meta["splits"].items()}}


# ---------------------------------------------------------------------------------------------------------- read
def _read_meta(storage: Storage, uri: str) -> dict:
    import pyarrow.fs as pafs

    path = storage.path(META_FILE)
    try:
        if storage.filesystem.get_file_info(path).type != pafs.FileType.File:
            raise SpecError(f"data pack '{uri}': no meta.json (not a deitlab pack, or its packing did not finish)")
        with storage.filesystem.open_input_stream(path) as f:
            raw = f.read()
    except SpecError:
        raise
    except Exception as err:  # unreachable endpoint, no bucket, denied
        raise SpecError(f"data pack '{uri}': {one_line(err)}") from None
    try:
        meta = json.loads(raw)
        ok = meta["format"] == FORMAT and all(isinstance(c, str) for c in meta["classes"]) and meta["classes"]
        for split in SPLITS:
            entry = meta["splits"][split]
            ok = ok and entry["rows"] == sum(s["rows"] for s in entry["shards"]) > 0
            ok = ok and all(sum(s["row_groups"]) == s["rows"] and isinstance(s["file"], str) for s in entry["shards"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise SpecError(f"data pack '{uri}': meta.json is not a valid {FORMAT} file")
    return meta


class ParquetPack:
    """A complete pack, opened for reading: meta.json read and checked; shards are opened when first read."""

    def __init__(self, uri: str):
        check_pack_uri(uri, "data pack")
        self.uri = uri
        self.storage = Storage.open(uri, create=False, what="data pack")
        self.meta = _read_meta(self.storage, uri)
        self.classes: list[str] = list(self.meta["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sizes(self) -> tuple[int, int]:
        return self.meta["splits"]["train"]["rows"], self.meta["splits"]["val"]["rows"]

    def split(self, name: str, cache_bytes: int = DEFAULT_CACHE_BYTES) -> ParquetImages:
        return ParquetImages(self.storage, self.uri, name, self.meta["splits"][name], self.classes, cache_bytes)


class ParquetImages:
    """One split of a pack: rows by index, as (JPEG byte tensors, labels).

    Reading: an index maps to its shard and row group (sizes from meta.json). A batch's missing row groups are read
    whole (image and label columns only), one task per shard on a small thread pool (pyarrow releases the GIL; S3
    latency overlaps), and kept in an LRU cache of at most `cache_bytes`. A split smaller than the cache is read once
    and then served from memory; for a larger one, a shuffled epoch reads about group_rows images per image used
    (row groups are Parquet's smallest read) — keep group_rows small for such sets.
    """

    encoded = True  # its batches are EncodedImages: data.BatchPipeline decodes them on the device

    def __init__(self, storage: Storage, uri: str, name: str, meta: dict, classes: list[str],
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.storage, self.uri, self.name, self.classes, self.cache_bytes = storage, uri, name, classes, cache_bytes
        self.shards = meta["shards"]
        sizes = [(shard, local, rows) for shard, s in enumerate(self.shards)
                 for local, rows in enumerate(s["row_groups"])]
        self._group_shard = np.array([s for s, _, _ in sizes], dtype=np.int64)
        self._group_local = np.array([g for _, g, _ in sizes], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum([r for _, _, r in sizes])]).astype(np.int64)
        self._reset()

    def _reset(self) -> None:
        self._files: dict[int, pq.ParquetFile] = {}
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self):  # picklable (Ray): open files, cache, lock and threads are rebuilt on the other side
        return {k: v for k, v in self.__dict__.items() if k not in ("_files", "_cache", "_cached_bytes", "_lock",
                                                                    "_pool")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def fingerprint(self) -> str:
        """What data_fingerprint hashes: the split's classes, rows and shard checksums (from meta.json)."""
        parts = [self.name, "|".join(self.classes)] + [f"{s['file']}|{s['rows']}|{s['sha256']}" for s in self.shards]
        return "\n".join(parts)

    def _file(self, shard: int) -> pq.ParquetFile:
        if shard not in self._files:
            entry = self.shards[shard]
            path = self.storage.path(entry["file"])
            parquet = pq.ParquetFile(self.storage.filesystem.open_input_file(path), pre_buffer=True)
            groups = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
            if groups != entry["row_groups"]:
                raise SpecError(f"data pack '{self.uri}': {entry['file']} does not match meta.json (row groups"
                                f" {groups[:4]}… against {entry['row_groups'][:4]}…); pack it again")
            self._files[shard] = parquet
        return self._files[shard]

    def _read(self, groups: list[int]) -> list[tuple[int, pa.Table]]:
        """Read row groups (global ids), grouped by shard: one task per shard, shards in parallel."""
        by_shard: dict[int, list[int]] = defaultdict(list)
        for group in groups:
            by_shard[int(self._group_shard[group])].append(group)

        def read(shard: int, ids: list[int]) -> list[tuple[int, pa.Table]]:
            parquet = self._file(shard)
            return [(g, parquet.read_row_group(int(self._group_local[g]), columns=["image", "label"],
                                               use_threads=False)) for g in ids]

        if len(by_shard) == 1:
            return read(*next(iter(by_shard.items())))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(8, thread_name_prefix=f"deitlab-pack-{self.name}")
        return [pair for result in self._pool.map(lambda item: read(*item), by_shard.items()) for pair in result]

    def rows(self, indices) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The rows at `indices` (any order, repeats allowed): JPEG bytes as 1-D uint8 tensors, labels as int64."""
        import torch

        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        group_of = np.searchsorted(self._starts, idx, side="right") - 1
        needed = np.unique(group_of)
        with self._lock:
            for group, table in self._read([int(g) for g in needed if int(g) not in self._cache]):
                self._cache[group] = table
                self._cached_bytes += table.nbytes
            for group in needed:
                self._cache.move_to_end(int(group))
            tables = [self._cache[int(g)] for g in needed]
            while self._cached_bytes > self.cache_bytes and len(self._cache) > len(needed):  # LRU, never this batch's
                self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        # positions in the concatenation of the needed groups, in batch order
        offsets = np.concatenate([[0], np.cumsum([t.num_rows for t in tables])])
        positions = pa.array(offsets[np.searchsorted(needed, group_of)] + idx - self._starts[group_of])
        images = pa.chunked_array([c for t in tables for c in t.column("image").chunks], pa.binary())
        labels = pa.chunked_array([c for t in tables for c in t.column("label").chunks], pa.int32())
        return _tensors(images.take(positions).combine_chunks()), torch.from_numpy(
            labels.take(positions).to_numpy().astype(np.int64))


def _tensors(array: pa.BinaryArray) -> list[torch.Tensor]:
    """A binary array as views into one uint8 tensor (one copy; page-locked when CUDA is there, for nvJPEG)."""
    import torch

    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset: array.offset + len(array) + 1]
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]]
    blob = torch.empty(len(data), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    blob.numpy()[:] = data
    starts = (offsets - offsets[0]).tolist()
    return [blob[a:b] for a, b in zip(starts[:-1], starts[1:])]


class ParquetBatches:
    """This rank's batches of a pack split, by data.py's sharding rule (ShardBatchSampler: shuffled by (seed, epoch),
    padded to a multiple of world_size and dealt round-robin for training; in order, unpadded for validation), as
    (EncodedImages, int64 labels). `prefetch` batches are read ahead on a background thread while one trains."""

    def __init__(self, images: ParquetImages, batch_size: int, *, shuffle: bool, rank: int = 0, world_size: int = 1,
                 seed: int = 0, prefetch: int = 2, repeats: int = 1):
        self.images, self.prefetch = images, prefetch
        self.sampler = ShardBatchSampler(len(images), batch_size, shuffle=shuffle, rank=rank, world_size=world_size,
                                         seed=seed, repeats=repeats)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple]:
        producer = ThreadPoolExecutor(1, thread_name_prefix="deitlab-pack-prefetch")
        pending: deque = deque()
        try:
            for idx in self.sampler.index_batches():
                pending.append(producer.submit(self.images.rows, idx.numpy()))
                if len(pending) > self.prefetch:
                    images, labels = pending.popleft().result()
                    yield EncodedImages(images), labels
            while pending:
                images, labels = pending.popleft().result()
                yield EncodedImages(images), labels
        finally:  # also when the consumer stops early: no reads left running
            producer.shutdown(wait=True, cancel_futures=True)
