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

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "cluster" / "mlflow"
BIN = Path(sys.executable).parent
BUCKET = "deitlab-service"
COMPOSE_DB = "mlflow@postgres:5432/mlflow"  # the database host/user compose.yaml and basic_auth.ini name


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


# ------------------------------------------------------------------------------------------- static, no server
def test_compose_and_kubernetes_run_the_same_server():
    command, environment = _mlflow_service()
    container = _k8s_container()
    # Variables are written ${VAR…} in compose and $(VAR) in Kubernetes: compare what is left.
    def normal(args):
        return [re.sub(r"\$\{(\w+)[^}]*\}|\$\((\w+)\)", lambda m: f"<{m.group(1) or m.group(2)}>", a) for a in args]
    assert normal(command) == normal(container["command"])
    assert {"--serve-artifacts", "--app-name=basic-auth"} <= set(command)
    # Kubernetes expands $(VAR) in a command from the container's env only: those variables are env entries there.
    in_command = {m for arg in container["command"] for m in re.findall(r"\$\((\w+)\)", arg)}
    assert set(environment) | in_command == {e["name"] for e in container["env"]}
    for env in container["env"]:
        if re.search(r"PASSWORD|SECRET|ACCESS_KEY", env["name"]):  # credentials only from a Secret
            assert "secretKeyRef" in env.get("valueFrom", {}), env
        # MLflow and boto3 take an empty variable as set: MLFLOW_S3_ENDPOINT_URL="" is an invalid endpoint.
        assert env.get("value") != "", env
    assert not [k for k, v in environment.items() if v.endswith(":-}")], environment
    dockerfile = (SERVICE / "Dockerfile").read_text()
    pinned = re.search(r"MLFLOW_VERSION=(\S+)", dockerfile).group(1)
    pyproject = (ROOT / "pyproject.toml").read_text()
    low, high = re.search(r'"mlflow>=([\d.]+),<(\d+)"', pyproject).groups()
    version = tuple(int(p) for p in pinned.split("."))
    assert tuple(int(p) for p in low.split(".")) <= version < (int(high),)  # inside pyproject's range
    assert container["image"].endswith(f"deitlab-mlflow:{pinned}") and f"deitlab-mlflow:{pinned}" in \
        (SERVICE / "compose.yaml").read_text()


# A secret-named key with a value (KEY=VALUE, key: value, "key": "value"); the value must be a placeholder, a
# ${VAR}/$(VAR) reference or a {secretKeyRef…} mapping.
ASSIGNED = re.compile(r"(?i)([\w-]*(?:password|secret|token|access_key)[\w-]*)[\\\"']*[ \t]*[:=][ \t]*(\S*)")
ALLOWED = re.compile(r"REPLACE_ME|\$.*|\{.*")
URL_PASSWORD = re.compile(r"://[^/\s:@]+:(?!\$)[^/\s@]+@")


def _literal_secrets(text: str) -> list[str]:
    found = [f"{key}={value}" for key, value in ASSIGNED.findall(text) if not ALLOWED.fullmatch(value.strip("\\\"'"))]
    return found + URL_PASSWORD.findall(text) + re.findall(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b", text)


def test_no_literal_secret_under_cluster_mlflow():
    assert _literal_secrets("PGPASSWORD=hunter2 postgresql://mlflow:hunter2@db/mlflow")  # the scan does find them
    files = [p for p in SERVICE.rglob("*") if p.is_file() and p.name != ".env"]
    assert len(files) >= 8, files
    findings = {str(p.relative_to(ROOT)): found for p in files if (found := _literal_secrets(p.read_text()))}
    assert not findings
    # A filled-in .env (compose's secrets) is never committed.
    ignored = subprocess.run(["git", "check-ignore", "-q", str(SERVICE / ".env")], cwd=ROOT)
    assert ignored.returncode == 0, "cluster/mlflow/.env is not git-ignored"


# ------------------------------------------------------------------------------------------- the running server
def _call(url: str, auth: tuple[str, str] | None = None, body: dict | None = None) -> tuple[int, dict]:
    """(HTTP status, JSON answer) of a GET (no body) or POST; status 0 when nothing listens."""
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            json_answer = response.headers.get_content_type() == "application/json"  # /health says OK
            return response.status, json.loads(response.read()) if json_answer else {}
    except urllib.error.HTTPError as err:
        return err.code, {}
    except OSError:
        return 0, {}


@pytest.fixture(scope="module")
def service(s3_endpoint, tmp_path_factory):
    """compose.yaml's mlflow command and environment, the database host pointed at a local PostgreSQL (its
    `postgres` user, trust auth), the port at a free one. Yields (URL, admin credentials)."""
    if postgres_available():
        pytest.skip(postgres_available())
    s3_client(s3_endpoint).create_bucket(Bucket=BUCKET)
    admin = ("admin", secrets.token_hex(12))
    tmp = tmp_path_factory.mktemp("mlflow-service")
    with Postgres(base_dir="/tmp") as postgres:
        port = free_port()
        local_db = f"postgres@127.0.0.1:{postgres.port}/mlflow"
        values = {"MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlartifacts", "POSTGRES_PASSWORD": "unused",
                  "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
                  **{k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}}
        command, environment = _mlflow_service()
        command = [_interpolate(a, values).replace(COMPOSE_DB, local_db)
                   .replace("--host=0.0.0.0", "--host=127.0.0.1").replace("--port=5000", f"--port={port}")
                   for a in command]
        ini = tmp / "basic_auth.ini"  # the image's config (Dockerfile: MLFLOW_AUTH_CONFIG_PATH), same database swap
        ini.write_text((SERVICE / "basic_auth.ini").read_text().replace(COMPOSE_DB, local_db))
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
               **{k: _interpolate(v, values) for k, v in environment.items()},
               "MLFLOW_AUTH_CONFIG_PATH": str(ini),
               # What this test adds: moto is S3-compatible, not AWS (README: MinIO), and one uvicorn worker
               # instead of 4 (MLFLOW_WORKERS, the --workers default) starts faster on 2 shared cores.
               "MLFLOW_S3_ENDPOINT_URL": f"http://{s3_endpoint}", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
               "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required", "MLFLOW_WORKERS": "1"}
        with open(tmp / "server.log", "wb") as log:
            server = subprocess.Popen([str(BIN / command[0]), *command[1:]], env=env, cwd=tmp, stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 420  # generous: the 2 cores are shared (212 s seen in CI beside a quickstart)
            while _call(f"{url}/health")[0] != 200:
                assert server.poll() is None and time.monotonic() < deadline, (tmp / "server.log").read_text()[-3000:]
                time.sleep(0.25)
            yield url, admin
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # uvicorn and its workers share the session
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def test_the_server_refuses_strangers_and_serves_a_user_that_trains_a_run(service, s3_endpoint, tmp_path):
    url, admin = service
    search = f"{url}/api/2.0/mlflow/experiments/search"
    assert _call(search, body={"max_results": 10})[0] == 401  # no credentials
    assert _call(search, ("admin", "wrong"), {"max_results": 10})[0] == 401
    user = ("alice", secrets.token_hex(12))
    assert _call(f"{url}/api/2.0/mlflow/users/create", admin, {"username": user[0], "password": user[1]})[0] == 200
    assert _call(search, user, {"max_results": 10})[0] == 200

    spec = write_yaml(tmp_path / "service.yaml", json.dumps({
        "name": "via-service", "student": TINY_STUDENT, "distillation": {"mode": "none"}, "optim": {"epochs": 1},
        "run": {"workdir": str(tmp_path / "work"), "tracking_uri": url, "experiment": "service"}}))
    client_env = {**os.environ, "MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1]}

    # A wrong password: one line, exit 2, before Ray starts or anything is written, here or in the store.
    wrong = subprocess.run([str(BIN / "deitlab"), "train", str(spec)], capture_output=True, text=True, timeout=300,
                           env={**client_env, "MLFLOW_TRACKING_PASSWORD": "not-" + user[1]})
    assert wrong.returncode == 2 and wrong.stderr == (
        f"error: MLflow at {url} refused the credentials (HTTP 401, user 'alice'): set"
        " MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD\n"), wrong.stderr[-3000:]
    assert not (tmp_path / "work").exists()
    status, found = _call(search, admin, {"max_results": 10})
    assert status == 200 and [e["name"] for e in found["experiments"]] == ["Default"]  # no experiment, no run
    # The read-only commands check too (no username at all).
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
    assert run.info.status == "FINISHED" and 0 <= run.data.metrics["acc"] <= 1, (run.info, run.data.metrics)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: the client never talks to S3
    keys = [o["Key"] for o in s3_client(s3_endpoint).list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any(k.endswith(f"/{run.info.run_id}/artifacts/spec.json") for k in keys), keys  # landed in the bucket
