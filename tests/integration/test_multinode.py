"""Two Ray nodes (two raylets from `ray start`, on this machine) with token authentication; a 2-worker run placed
STRICT_SPREAD must put one worker on each node, keep its checkpoints in (moto) S3 and finish in MLflow."""
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import TINY_STUDENT, free_port, s3_client, write_yaml

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def _stop(process: subprocess.Popen) -> None:
    """`ray start --block` drains for 30 s on SIGTERM; nothing runs on these nodes any more, so kill the group."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture()
def two_node_cluster(tmp_path):
    """A head node and a second node, each with one CPU, sharing a fresh auth token (not ~/.ray's)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    port = free_port()
    common = ["--num-cpus", "1", "--block", "--disable-usage-stats"]
    nodes = [subprocess.Popen([str(BIN / "ray"), "start", "--head", "--port", str(port), "--include-dashboard",
                               "false", *common], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "head.log", "wb"))]
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while subprocess.run([str(BIN / "ray"), "status", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and nodes[0].poll() is None, (tmp_path / "head.log").read_text()
            time.sleep(1)
        nodes.append(subprocess.Popen([str(BIN / "ray"), "start", "--address", address, *common], env=env,
                                      start_new_session=True, stdout=subprocess.DEVNULL,
                                      stderr=open(tmp_path / "node.log", "wb")))
        while "2 node_" not in _active_nodes(address, env):
            assert time.monotonic() < deadline and nodes[1].poll() is None, (tmp_path / "node.log").read_text()
            time.sleep(1)
        yield address, env
    finally:
        for node in reversed(nodes):
            _stop(node)
        # `ray start --head` recorded this cluster as the machine's current one; `ray stop` would remove that record
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def _active_nodes(address: str, env: dict) -> str:
    status = subprocess.run([str(BIN / "ray"), "status", "--address", address], env=env, capture_output=True,
                            text=True).stdout
    active = status.split("Active:")[-1].split("Pending:")[0]
    return f"{active.count('node_')} node_"


def test_two_workers_spread_over_two_nodes_with_checkpoints_in_s3(two_node_cluster, s3_endpoint, tmp_path):
    address, env = two_node_cluster
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket="deitlab-nodes")
    spec = write_yaml(tmp_path / "spread.yaml", json.dumps({
        "name": "spread", "student": TINY_STUDENT, "distillation": {"mode": "none"}, "optim": {"epochs": 2},
        "data": {"batch_size": 16},
        "run": {"workers": 2, "placement": "strict_spread", "workdir": str(tmp_path / "work"),
                "storage": f"s3://deitlab-nodes/runs?endpoint_override={s3_endpoint}&scheme=http"}}))
    result = subprocess.run([str(BIN / "deitlab"), "train", str(spec), "--ray-address", address], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("deitlab").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["run.placement"] == "strict_spread"
    nodes = run.data.tags["deitlab.worker_nodes"].split(",")
    assert len(nodes) == 2 and nodes[0] != nodes[1]  # one worker per node
    assert [m.step for m in client.get_metric_history(run.info.run_id, "acc")] == [1, 2]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="deitlab-nodes", Prefix="runs/spread-")["Contents"]]
    assert sum(k.endswith("/manifest.json") for k in keys) == 2 and sum(k.endswith("/state.pt") for k in keys) == 2
