"""Two Ray nodes (two raylets from `ray start` on this machine, each with its own temp dir) with token
authentication and the dashboard's Jobs API on the head: a 2-worker run placed STRICT_SPREAD puts one worker on each
node; a sweep submitted as a Ray Job runs its trials on both nodes (a custom resource each node has once), keeps its
checkpoints in (moto) S3, and completes when the worker node is killed mid-sweep."""
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY_STUDENT, free_port, s3_client, write_yaml
from mlflow import MlflowClient

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
SLOT = {"slot": 1}  # one trial's worker per node: with two trials at once, they must land on both nodes


def _stop(process: subprocess.Popen) -> None:
    """`ray start --block` drains for 30 s on SIGTERM; kill the node's process group (raylet, workers) at once."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@dataclass
class Cluster:
    address: str  # the GCS, for `--ray-address`
    dashboard: str  # the Jobs API, for `sweep submit --address`
    env: dict
    worker: subprocess.Popen  # the second node's `ray start --block`
    head_node: str  # the head's node id (short), as runs record it in deitlab.worker_nodes


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A head node and a second node, each with 2 CPUs and one `slot`, sharing a fresh auth token (not ~/.ray's).
    Each node has its own short temp dir (Unix socket paths must stay under 108 bytes)."""
    logs = tmp_path_factory.mktemp("nodes")
    temp_dirs = [tempfile.mkdtemp(prefix=f"dl{role}-") for role in ("h", "w")]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    port, dashboard_port, *agent_ports = (free_port() for _ in range(4))
    common = ["--num-cpus", "2", "--resources", json.dumps(SLOT), "--block", "--disable-usage-stats"]
    nodes = [subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
         str(dashboard_port), "--dashboard-agent-listen-port", str(agent_ports[0]), "--temp-dir", temp_dirs[0],
         *common], env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=open(logs / "head.log", "wb"))]
    address, dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 240  # the 2 cores are shared with the rest of the suite
        while subprocess.run([str(BIN / "ray"), "status", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and nodes[0].poll() is None, (logs / "head.log").read_text()
            time.sleep(1)
        nodes.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--address", address, "--dashboard-agent-listen-port", str(agent_ports[1]),
             "--temp-dir", temp_dirs[1], *common], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=open(logs / "node.log", "wb")))
        while _active_nodes(address, env) != 2:
            assert time.monotonic() < deadline and nodes[1].poll() is None, (logs / "node.log").read_text()
            time.sleep(1)
        # A job is accepted: the head's job agent is up (a submission waits only 10 s for one that is starting)
        probe = f"from ray.job_submission import JobSubmissionClient as C; C('{dashboard}').submit_job(entrypoint='true')"
        while subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and nodes[0].poll() is None, (logs / "head.log").read_text()
            time.sleep(1)
        head_node = subprocess.run(
            [sys.executable, "-c", "import ray; ray.init(); print(ray.get_runtime_context().get_node_id()[:8])"],
            env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, check=True).stdout.split()[-1]
        yield Cluster(address, dashboard, env, nodes[1], head_node)
    finally:
        for node in reversed(nodes):
            _stop(node)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
        # `ray start --head` recorded this cluster as the machine's current one; `ray stop` would remove that record
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def _active_nodes(address: str, env: dict) -> int:
    status = subprocess.run([str(BIN / "ray"), "status", "--address", address], env=env, capture_output=True,
                            text=True).stdout
    return status.split("Active:")[-1].split("Pending:")[0].count("node_")


def test_two_workers_spread_over_two_nodes_with_checkpoints_in_s3(two_node_cluster, s3_endpoint, tmp_path):
    address, env = two_node_cluster.address, two_node_cluster.env
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
    # Each node's first rank samples its own node, under its node id (the run spans two).
    sampled = {k.split("/")[1] for k in run.data.metrics if k.startswith("system/")
               and k.endswith("/cpu_utilization_percentage")}
    assert sampled == set(nodes), result.stderr[-6000:]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "acc")] == [1, 2]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="deitlab-nodes", Prefix="runs/spread-")["Contents"]]
    assert sum(k.endswith("/manifest.json") for k in keys) == 2 and sum(k.endswith("/state.pt") for k in keys) == 2


def test_stock_ray_job_submit_runs_a_sweep_on_both_nodes(two_node_cluster, tmp_path):
    """`ray job submit --working-dir DIR -- deitlab sweep run …`, Ray's own client: the job starts in Ray's temporary
    copy of DIR. A relative --workdir would keep the records there, where Ray deletes them: refused in one line. An
    absolute one: the sweep finishes, its trials spread over both nodes, everything recorded under it."""
    cluster, job_dir, workdir = two_node_cluster, tmp_path / "job", tmp_path / "work"
    job_dir.mkdir()
    write_yaml(job_dir / "sweep.yaml", json.dumps({
        "name": "stock", "seeds": [0, 1], "max_concurrent": 2,
        "experiment": {"student": TINY_STUDENT, "distillation": {"mode": "none"},
                       "optim": {"epochs": 2, "warmup_epochs": 0},
                       "run": {"experiment": "stock", "resources": SLOT, "log_every_steps": 0}}}))

    def submit(workdir_arg: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir",
                               str(job_dir), "--", "deitlab", "sweep", "run", "sweep.yaml", "--workdir", workdir_arg],
                              env=cluster.env, capture_output=True, text=True, timeout=600)

    refused = submit("relative-work")
    assert refused.returncode != 0  # the job failed
    log = refused.stdout + refused.stderr
    assert "error: the MLflow store would be kept in" in log and "temporary working_dir" in log, log[-3000:]
    assert "Traceback" not in log
    assert not (job_dir / "relative-work").exists()

    done = submit(str(workdir))
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in log, log[-3000:]
    assert "Traceback" not in log
    trials = _trials(workdir / "mlflow.db", "stock")
    assert sorted(trials) == ["s0", "s1"] and all(r.info.status == "FINISHED" for r in trials.values())
    assert len({r.data.tags["deitlab.worker_nodes"] for r in trials.values()}) == 2  # one trial on each node
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for run in trials.values():
        assert [m.step for m in client.get_metric_history(run.info.run_id, "acc")] == [1, 2]
    assert len(list((workdir / "ray_results").glob("s*-*/checkpoint_*/manifest.json"))) >= 2


def _trials(tracking_db: Path, experiment: str) -> dict:
    client = MlflowClient(f"sqlite:///{tracking_db}")
    found = client.get_experiment_by_name(experiment) if tracking_db.exists() else None
    if found is None:
        return {}
    return {r.info.run_name: r for r in client.search_runs([found.experiment_id], "tags.`deitlab.kind` = 'trial'")}


def _checkpointed(s3, run_dir: str) -> int:
    """The newest epoch with a complete checkpoint in S3 under `run_dir` (0: none yet)."""
    epochs = [0]
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="deitlab-sweeps", Prefix="ray/"):
        for obj in page.get("Contents", []):
            if run_dir in obj["Key"] and obj["Key"].endswith("/manifest.json"):
                try:
                    body = s3.get_object(Bucket="deitlab-sweeps", Key=obj["Key"])["Body"].read()
                except s3.exceptions.NoSuchKey:  # an old checkpoint Ray removed meanwhile
                    continue
                epochs.append(json.loads(body)["epoch"])
    return max(epochs)


def test_submitted_sweep_runs_on_both_nodes_and_survives_losing_one(two_node_cluster, s3_endpoint, tmp_path):
    """Last in this module: it kills the second node."""
    cluster, workdir = two_node_cluster, tmp_path / "work"
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket="deitlab-sweeps")
    spec = write_yaml(tmp_path / "nodes.yaml", json.dumps({
        "name": "nodes", "seeds": [0, 1], "max_concurrent": 2,
        "experiment": {"student": TINY_STUDENT, "distillation": {"mode": "none"},
                       "data": {"augment": {"rotate": 0, "translate": 0, "scale": [1, 1]}},
                       "optim": {"epochs": 6, "warmup_epochs": 0},
                       "run": {"workdir": str(workdir), "experiment": "nodes", "resources": SLOT, "log_every_steps": 0,
                               "storage": f"s3://deitlab-sweeps/ray?endpoint_override={s3_endpoint}&scheme=http"}}}))
    submit = subprocess.Popen([str(BIN / "deitlab"), "sweep", "submit", str(spec), "--address", cluster.dashboard],
                              env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db, deadline = workdir / "mlflow.db", time.monotonic() + 600
    # Both trials train at once, one on each node (each rank 0 tags its node when it starts).
    while True:
        trials = _trials(db, "nodes")
        nodes = {name: run.data.tags.get("deitlab.worker_nodes") for name, run in trials.items()}
        if len(trials) == 2 and all(nodes.values()):
            break
        assert submit.poll() is None, submit.stdout.read()[-3000:] + submit.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"trials did not start on both nodes: {nodes}"
        time.sleep(0.5)
    assert len(set(nodes.values())) == 2, nodes  # one trial per node: each node has one slot
    [on_worker] = [name for name, node in nodes.items() if node != cluster.head_node]
    # The kill lands right after that trial's first checkpoint reached S3, an event, whatever the machine's speed:
    # the trial then has a checkpoint to go on from and epochs left to train.
    run_dir = f"/{on_worker}-{trials[on_worker].info.run_id[:8]}/"
    while _checkpointed(s3, run_dir) < 1:
        assert submit.poll() is None, submit.stdout.read()[-3000:] + submit.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{on_worker} wrote no checkpoint"
        time.sleep(0.1)
    checkpointed = _checkpointed(s3, run_dir)
    _stop(cluster.worker)  # the second node dies mid-sweep: raylet, its Train worker, everything on it
    # Both read after the first checkpoint and before the kill had any effect on MLflow: the trial had epochs left.
    assert checkpointed < 6, "the trial on the second node ended before the kill"
    assert _trials(db, "nodes")[on_worker].info.status == "RUNNING"
    out, err = submit.communicate(timeout=max(deadline - time.monotonic(), 60))
    assert submit.returncode == 0, out[-3000:] + err[-3000:]
    assert "Traceback" not in err

    trials = _trials(db, "nodes")
    assert sorted(trials) == ["s0", "s1"] and all(r.info.status == "FINISHED" for r in trials.values())
    client = MlflowClient(f"sqlite:///{db}")
    for name, run in trials.items():  # every epoch once, in order: the lost trial went on from its checkpoint
        assert [m.step for m in client.get_metric_history(run.info.run_id, "acc")] == [1, 2, 3, 4, 5, 6], name
    moved = trials[on_worker].data.tags
    assert int(moved["deitlab.worker_failures"]) >= 1 and moved["deitlab.worker_nodes"] == cluster.head_node, moved
    assert "deitlab.worker_failures" not in trials[({"s0", "s1"} - {on_worker}).pop()].data.tags
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="deitlab-sweeps", Prefix="ray/")["Contents"]]
    for name in ("s0", "s1"):  # each trial's checkpoints, and Tune's own state, landed in S3
        assert any(f"/{name}" in k and k.endswith("/manifest.json") for k in keys), (name, keys[:20])
    assert any(k.endswith("experiment_state.json") or "experiment_state" in k for k in keys), keys[:20]
