"""Checkpoints that are never picked half-written, on a local disk or S3-compatible object storage.

A checkpoint is a directory holding `state.pt` (model, optimiser, schedule, epoch, metric history) and, written last,
`manifest.json` with the epoch and each file's size and SHA-256. A directory without a manifest, or whose files do
not match it (an interrupted upload, a truncated file), is skipped with a warning and the next older one is used.

Storage is a pyarrow filesystem (what Ray Train itself writes through): a local path, or
`s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http` for MinIO, moto or any S3-compatible endpoint.
Credentials come from the environment of each process (AWS_ACCESS_KEY_ID, profiles, instance roles), never the spec.
This module needs torch and pyarrow only; torch is imported where checkpoints are written or read, so checking a
storage URI (the CLI does it before anything starts) stays quick.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from deitlab.errors import SpecError, one_line

log = logging.getLogger("deitlab.checkpoints")

FORMAT = "deitlab.checkpoint/1"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
PREFIX = "checkpoint_"  # Ray Train's directory names: checkpoint_<timestamp>


class BadCheckpoint(Exception):
    """A checkpoint directory that must not be loaded (incomplete, truncated or corrupt)."""


# ------------------------------------------------------------------------------------------------ write / read
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint(directory: str | Path, state: dict[str, Any], *, extra_files: tuple[str, ...] = ()) -> None:
    """Write state.pt, then the manifest (last: its presence marks the directory complete)."""
    import torch

    directory = Path(directory)
    torch.save(state, directory / STATE_FILE)
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
             for name in (STATE_FILE, *extra_files)}
    manifest = {"format": FORMAT, "epoch": int(state["epoch"]), "files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint directory; BadCheckpoint naming what is wrong otherwise."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadCheckpoint("no manifest.json (written partially?)") from None
    except (ValueError, UnicodeDecodeError):
        raise BadCheckpoint("manifest.json is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadCheckpoint(f"manifest.json is not a {FORMAT} manifest")
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise BadCheckpoint(f"{name} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise BadCheckpoint(f"{name} is truncated ({size} of {expected['bytes']} bytes)")
        if _sha256(path) != expected["sha256"]:
            raise BadCheckpoint(f"{name} does not match its checksum")
    return manifest


def read_checkpoint(directory: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The verified training state in a checkpoint directory (tensors only: weights_only=True)."""
    import torch

    verify_checkpoint(directory)
    try:
        return torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as err:  # a file that matches its manifest but still does not unpickle
        raise BadCheckpoint(f"{STATE_FILE} does not load: {one_line(err, 200)}") from None


def torch_file_problem(path: str | Path) -> str | None:
    """Why the file at `path` cannot be one torch.save wrote, judged from its bytes without importing torch (a
    truncated download or a file of something else then fails at once, in words a user can act on); None when it may
    be one, and torch.load decides."""
    import zipfile

    path = Path(path)
    if zipfile.is_zipfile(path):  # torch.save's format since 1.6: its directory sits at the end of the file
        return None
    try:
        with path.open("rb") as f:
            head = f.read(2)
    except OSError as err:  # no permission, a broken link
        return f"cannot read it: {err.strerror or type(err).__name__}"
    if not head:
        return "empty file"
    if head == b"PK":
        return "truncated: its zip directory is missing"
    if head[:1] == b"\x80":  # a pickle: torch's legacy format
        return None
    return "not a file torch.save wrote"


def model_file(path: str | Path) -> Path:
    """The file a model path names — the path, or the one .pt file in a folder (an MLflow model's downloaded
    artifacts) — checked without torch: it exists and may be a file torch.save wrote. SpecError in one line
    otherwise."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.pt"))
        if len(files) != 1:
            raise SpecError(f"{path}: expected one .pt model file in the directory, found {len(files)}")
        path = files[0]
    return _torch_file(path, "", "model checkpoint")


def student_file(path: str | Path) -> Path:
    """The file an `init_from` path names — a checkpoint folder's state.pt, a model file, or the one .pt in a folder
    without state.pt — checked without torch like model_file."""
    path = Path(path)
    if path.is_dir() and not (path / STATE_FILE).is_file():
        try:
            return model_file(path)
        except SpecError as err:
            raise SpecError(f"init_from {err}") from None
    if path.is_dir():
        path = path / STATE_FILE
    return _torch_file(path, "init_from ", "checkpoint")


def _torch_file(path: Path, prefix: str, what: str) -> Path:
    """`path` if it is a file torch.save may have written; SpecError '{prefix}{path}: …' naming `what` otherwise."""
    if not path.is_file():
        raise SpecError(f"{prefix}{path}: no such {what}")
    problem = torch_file_problem(path)
    if problem:
        raise SpecError(f"{prefix}{path}: not a readable {what} ({problem})")
    return path


# ------------------------------------------------------------------------------------------------------ storage
def _aws_profiles(path: Path, config: bool) -> set[str]:
    """Profile names in an AWS credentials or config file (config names them `[profile NAME]`, but `[default]`)."""
    import configparser

    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        return set()
    return {name.removeprefix("profile ").strip() if config else name for name in parser.sections()}


def check_aws_credentials(what: str) -> None:
    """The AWS_* credentials in this environment are complete and name a profile that exists. The SDKs would
    otherwise fail later, far from the cause: boto3 with ProfileNotFound deep inside MLflow, pyarrow's SDK by
    passing over half a key pair to whatever other credentials it finds (or none). SpecError in one line, naming
    `what` needed them."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if bool(key) != bool(secret):
        given, missing = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if key else ("AWS_SECRET_ACCESS_KEY",
                                                                                    "AWS_ACCESS_KEY_ID")
        raise SpecError(f"{what}: {given} is set but {missing} is not; set both, or neither to use a profile or an"
                        " instance role")
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE")
    if profile:
        home = Path.home() / ".aws"
        credentials = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or home / "credentials")
        config = Path(os.environ.get("AWS_CONFIG_FILE") or home / "config")
        if profile not in _aws_profiles(credentials, config=False) | _aws_profiles(config, config=True):
            raise SpecError(f"{what}: AWS_PROFILE '{profile}' is in neither {credentials} nor {config}")


def _with_region(uri: str) -> str:
    """pyarrow needs a region for custom endpoints (else it asks AWS); add the environment's or us-east-1."""
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    query.setdefault("region", os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_override" not in query:
        split = urlsplit(endpoint)
        query["endpoint_override"] = split.netloc or endpoint
        query.setdefault("scheme", split.scheme or "https")
    return urlunsplit(parts._replace(query=urlencode(query)))


def _probe_folder(folder: Path, what: str) -> None:
    """Create and remove a folder in `folder`, leaving it as it was (its times restored): os.access says yes for root
    on read-only and pseudo file systems (/proc, /sys), where only trying tells."""
    before = folder.stat()
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".deitlab-probe-", dir=folder))
    except OSError as err:
        raise SpecError(f"{what}: cannot create folders in '{folder}' ({err.strerror or err})") from None
    try:
        os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))
    except OSError:
        pass  # not ours to touch: its times moved, its contents did not


@dataclass(frozen=True)
class Storage:
    """Where a run's Ray results and checkpoints live: a pyarrow filesystem and a root path on it."""

    filesystem: Any  # pyarrow.fs.FileSystem
    root: str
    uri: str  # as the user wrote it, for messages

    @classmethod
    def open(cls, uri: str, create: bool = True, what: str = "run.storage") -> Storage:
        """Resolve `uri` (local path or s3://…) and check it can be written: SpecError in one line if not, naming
        the URI as `what` (the spec field or option it came from)."""
        import pyarrow.fs as pafs

        try:
            if uri.startswith("s3://"):
                if not urlsplit(uri).netloc:
                    raise SpecError(f"{what} '{uri}': no bucket; expected s3://bucket/prefix")
                check_aws_credentials(f"{what} '{uri}'")
                filesystem, root = pafs.FileSystem.from_uri(_with_region(uri))
            elif "://" in uri and not uri.startswith("file://"):
                raise SpecError(f"{what} '{uri}': expected a local path or s3://bucket/prefix")
            else:
                root = str(Path(uri.removeprefix("file://")).expanduser().resolve())
                filesystem = pafs.LocalFileSystem()
            if create:
                filesystem.create_dir(root, recursive=True)
                filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        except SpecError:
            raise
        except Exception as err:  # unreachable endpoint, no such bucket, denied, bad URI
            raise SpecError(f"{what} '{uri}': {one_line(err)}") from None
        return cls(filesystem, root.rstrip("/"), uri)

    @classmethod
    def probe(cls, uri: str, what: str = "run.storage") -> Storage:
        """`open` without writing: the bucket exists (S3), or the nearest existing folder on the way to the root is a
        folder this process may write in (local). What the CLI checks before Ray starts or anything is created."""
        import pyarrow.fs as pafs

        storage = cls.open(uri, create=False, what=what)
        if isinstance(storage.filesystem, pafs.LocalFileSystem):
            existing = Path(storage.root)
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
            if not existing.is_dir():
                raise SpecError(f"{what} '{uri}': exists and is not a folder" if str(existing) == storage.root
                                else f"{what} '{uri}': '{existing}' is a file, not a folder")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise SpecError(f"{what} '{uri}': cannot write in '{existing}'")
            _probe_folder(existing, f"{what} '{uri}'")
            return storage
        bucket = storage.root.split("/")[0]
        try:
            found = storage.filesystem.get_file_info(bucket).type != pafs.FileType.NotFound
        except Exception as err:  # unreachable endpoint, denied
            raise SpecError(f"{what} '{uri}': {one_line(err)}") from None
        if not found:
            raise SpecError(f"{what} '{uri}': bucket '{bucket}' does not exist")
        return storage

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def checkpoints(self, run_name: str) -> list[str]:
        """Checkpoint directory paths of a Ray Train run, newest name (timestamp) first."""
        import pyarrow.fs as pafs

        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path(run_name), allow_not_found=True))
        found = [i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(PREFIX)]
        return sorted(found, reverse=True)

    def download(self, path: str, destination: Path) -> Path:
        import pyarrow.fs as pafs

        destination.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(destination), source_filesystem=self.filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        return destination

    def display(self, path: str) -> str:
        """A path as the user would write it (s3://bucket/key for S3)."""
        return f"s3://{path}" if self.uri.startswith("s3://") else path

    def _epoch(self, path: str) -> int | None:
        """The epoch a checkpoint's manifest claims, or None (warned) when it has no readable manifest."""
        try:
            with self.filesystem.open_input_stream(f"{path}/{MANIFEST_FILE}") as f:
                return int(json.loads(f.read())["epoch"])
        except Exception:
            log.warning("skipping checkpoint %s: no readable manifest.json (written partially?)", self.display(path))
            return None

    def latest_valid(self, run_name: str, map_location: Any = "cpu"):
        """(state, path) of the newest complete checkpoint of `run_name`, warning about each one skipped; or None.

        Newest by epoch, not by name: best-k retention keeps older directories around.
        """
        epochs = {path: self._epoch(path) for path in self.checkpoints(run_name)}
        for path in sorted((p for p, e in epochs.items() if e is not None), key=epochs.get, reverse=True):
            try:
                return self.load(path, map_location), path
            except BadCheckpoint as err:
                log.warning("skipping checkpoint %s: %s", self.display(path), err)
        return None

    def load(self, path: str, map_location: Any = "cpu") -> dict[str, Any]:
        """The verified state of the checkpoint directory at `path` (downloaded to a temporary directory)."""
        with tempfile.TemporaryDirectory() as tmp:
            return read_checkpoint(self.download(path, Path(tmp)), map_location)
