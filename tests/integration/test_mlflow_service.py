"""cluster/mlflow/ run for real: the tracking server command and environment of compose.yaml (the same as the
Kubernetes Deployment's), started here against a local PostgreSQL and a moto S3, with basic auth on."""
import base64
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import TINY_STUDENT, free_port, s3_client, write_yaml
from servers import Postgres, postgres_available

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(postgres_available() is not None, reason=str(postgres_available()))]
ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "cluster" / "mlflow"
BIN = Path(sys.executable).parent
BUCKET = "deitlab-service"


def _interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's variable syntax: ${VAR}, ${VAR:-default}, ${VAR:?error} (an unset required one fails the test)."""
    def one(match: re.Match) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3) or ""
        if values.get(name):
            return values[name]
        assert op != ":?", f"compose.yaml needs {name}: {rest}"
        return rest if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", one, text)


def _mlflow_service() -> tuple[list[str], dict[str, str]]:
    service = yaml.safe_load((SERVICE / "compose.yaml").read_text())["services"]["mlflow"]
    return service["command"], {k: str(v) for k, v in service["environment"].items()}


def _k8s_container() -> dict:
    docs = yaml.safe_load_all((SERVICE / "k8s" / "mlflow.yaml").read_text())
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_compose_and_kubernetes_run_the_same_server():
    command, environment = _mlflow_service()
    container = _k8s_container()
    # Variables are written ${VAR…} in compose and $(VAR) in Kubernetes: compare what is left.
    def normal(args):
        return [re.sub(r"\$\{(\w+)[^}]*\}|\$\((\w+)\)", lambda m: f"<{m.group(1) or m.group(2)}>", a) for a in args]
    assert normal(command) == normal(container["command"])
    # Kubernetes expands $(VAR) in a command from the container's env only: those variables are env entries there.
    in_command = {m for arg in container["command"] for m in re.findall(r"\$\((\w+)\)", arg)}
    assert set(environment) | in_command == {e["name"] for e in container["env"]}
    dockerfile = (SERVICE / "Dockerfile").read_text()
    pinned = re.search(r"MLFLOW_VERSION=(\S+)", dockerfile).group(1)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"mlflow>=([\d.]+),<(\d+)"', pyproject).group(1) <= pinned  # inside pyproject's range
    assert container["image"].endswith(f"deitlab-mlflow:{pinned}") and f"deitlab-mlflow:{pinned}" in \
        (SERVICE / "compose.yaml").read_text()


def _request(url: str, auth: tuple[str, str] | None = None, body: dict | None = None) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:  # not listening (yet)
        return 0


@pytest.fixture(scope="module")
def service(s3_endpoint, tmp_path_factory):
    """compose.yaml's mlflow command and environment, the database host pointed at a local PostgreSQL (its
    `postgres` user, trust auth) and the port at a free one. Yields (URL, admin credentials)."""
    s3_client(s3_endpoint).create_bucket(Bucket=BUCKET)
    admin = ("admin", secrets.token_hex(12))
    tmp = tmp_path_factory.mktemp("mlflow-service")
    with Postgres(base_dir="/tmp") as postgres:
        port = free_port()
        local_db = f"postgres@127.0.0.1:{postgres.port}/mlflow"
        values = {"MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlartifacts", "POSTGRES_PASSWORD": "unused",
                  "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
                  "MLFLOW_S3_ENDPOINT_URL": f"http://{s3_endpoint}", **{k: os.environ[k] for k in (
                      "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}}
        command, environment = _mlflow_service()
        command = [_interpolate(a, values).replace("mlflow@postgres:5432/mlflow", local_db)
                   .replace("--host=0.0.0.0", "--host=127.0.0.1").replace("--port=5000", f"--port={port}")
                   for a in command]
        ini = tmp / "basic_auth.ini"  # the image's config (Dockerfile: MLFLOW_AUTH_CONFIG_PATH), same database swap
        ini.write_text((SERVICE / "basic_auth.ini").read_text().replace("mlflow@postgres:5432/mlflow", local_db))
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")},
               **{k: _interpolate(v, values) for k, v in environment.items()},
               "MLFLOW_AUTH_CONFIG_PATH": str(ini), "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
               "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
        server = subprocess.Popen([str(BIN / command[0]), *command[1:]], env=env, cwd=tmp, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "wb"))
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while _request(f"{url}/health") != 200:
                assert server.poll() is None and time.monotonic() < deadline, (tmp / "server.log").read_text()[-3000:]
                time.sleep(1)
            yield url, admin
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def test_the_server_refuses_strangers_and_serves_a_user_that_trains_a_run(service, s3_endpoint, tmp_path):
    url, admin = service
    search = f"{url}/api/2.0/mlflow/experiments/search"
    assert _request(search, body={"max_results": 1}) == 401  # no credentials
    assert _request(search, ("admin", "wrong"), {"max_results": 1}) == 401
    user = ("alice", secrets.token_hex(12))
    assert _request(f"{url}/api/2.0/mlflow/users/create", admin, {"username": user[0], "password": user[1]}) == 200
    assert _request(search, user, {"max_results": 1}) == 200

    spec = write_yaml(tmp_path / "service.yaml", json.dumps({
        "name": "via-service", "student": TINY_STUDENT, "distillation": {"mode": "none"}, "optim": {"epochs": 1},
        "run": {"workdir": str(tmp_path / "work"), "tracking_uri": url, "experiment": "service"}}))
    client_env = {**os.environ, "MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1]}
    wrong = subprocess.run([str(BIN / "deitlab"), "train", str(spec)], capture_output=True, text=True, timeout=300,
                           env={**client_env, "MLFLOW_TRACKING_PASSWORD": "not-" + user[1]})
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stderr[-3000:]
    assert wrong.stderr == f"error: MLflow at {url} refused the credentials (HTTP 401, user 'alice'): set" \
                           " MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD\n"
    assert not (tmp_path / "work").exists()  # nothing written, no Ray started (it would have printed its warning)
    status = subprocess.run([str(BIN / "deitlab"), "sweep", "status", "any", "--tracking-uri", url],
                            capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_USERNAME": ""})
    assert status.returncode == 2 and status.stderr == (
        f"error: MLflow at {url} refused the credentials (HTTP 401, no MLFLOW_TRACKING_USERNAME / _PASSWORD): set"
        " MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD\n")

    trained = subprocess.run([str(BIN / "deitlab"), "train", str(spec)], capture_output=True, text=True,
                             timeout=600, env=client_env)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    from mlflow import MlflowClient

    os.environ.update(MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1])
    try:
        client = MlflowClient(url)
        [run] = client.search_runs([client.get_experiment_by_name("service").experiment_id])
    finally:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key)
    assert run.info.status == "FINISHED" and run.data.metrics["acc"] > 0.1
    keys = [o["Key"] for o in s3_client(s3_endpoint).list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any(run.info.run_id in k for k in keys)  # the run's artifacts went through the server into S3
