"""Shared fixtures. Integration tests share one local Ray and one MLflow store per session (Ray starts in ~5 s)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# The moto S3 server accepts any credentials; Ray's worker processes inherit these from the driver, so they must be
# set before the session's Ray starts. Real credentials in the environment are left alone. The values have the shape
# of real AWS keys: the secrets test checks that neither ever reaches MLflow (params, tags, artifacts).
PLANTED_AWS_KEY_ID = "AKIADEITLABTESTKEY01"
PLANTED_AWS_SECRET = "dEiTlAbTeSt/planted+SecretAccessKey0000x"
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "2")  # short test runs still get system metrics
for _key, _value in {"AWS_ACCESS_KEY_ID": PLANTED_AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": PLANTED_AWS_SECRET,
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                     "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}.items():
    os.environ.setdefault(_key, _value)

# Pretrained weights come from a Hugging Face hub cache the tests build (tests/hub.py), never from the hub: set before
# anything imports huggingface_hub (it reads both once), inherited by Ray's workers and the CLI's subprocesses.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="deitlab-hf-")
os.environ["HF_HUB_OFFLINE"] = "1"
atexit.register(shutil.rmtree, os.environ["HF_HOME"], True)

TINY_STUDENT = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="session")
def ray_session():
    import ray
    from deitlab.orchestration.cluster import ensure_ray

    ensure_ray(num_cpus=4)
    yield ray
    ray.shutdown()


def free_port() -> int:
    """A TCP port nothing listens on now (for servers the tests start)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real local S3 endpoint (moto's server) for the whole session: yields its host:port."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1")


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def ray_processes(title_prefix: str) -> list[int]:
    """Pids of this session's Ray processes whose title starts with `title_prefix` (Ray retitles them
    `ray::Class…`). Only descendants of this test process count: another Ray on the machine is not ours."""
    me, pids = os.getpid(), []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if not title.startswith(title_prefix):
            continue
        pid = ancestor = int(cmdline.parent.name)
        while ancestor > 1 and ancestor != me:
            ancestor = _parent(ancestor)
        if ancestor == me:
            pids.append(pid)
    return pids


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deitlab-work")


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def hub_cache():
    """The session's Hugging Face hub cache (HF_HOME, offline): tests add the pretrained weights they need."""
    from hub import HubCache

    return HubCache(Path(os.environ["HF_HOME"]))
