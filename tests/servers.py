"""Real servers for integration tests: a throw-away PostgreSQL cluster and an `mlflow server` in front of it.

    from servers import MlflowServer, Postgres, postgres_available

    with Postgres() as pg, MlflowServer(pg.uri, s3_endpoint) as server:
        MlflowClient(server.uri) ...
        server.stop(); server.start()      # an outage: same port, same database, same bucket

PostgreSQL comes from the Debian package `postgresql` (binaries in /usr/lib/postgresql/<major>/bin; set
DEITLAB_PG_BIN to use another directory). The server refuses to run as root, so when the tests run as root the cluster
is owned by, and every server command runs as, the `postgres` OS user (via runuser); as any other user it runs as that
user. Authentication is `trust`, and the server listens on 127.0.0.1 only, with its unix socket inside its own temp
dir: the URI holds no password, so printing it leaks nothing.
"""
from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import free_port

PG_OS_USER = "postgres"
_PG_TOOLS = ("initdb", "pg_ctl", "postgres")

# Servers still running when the interpreter exits (a test that forgot stop(), pytest -x, Ctrl-C) are stopped then:
# both outlive their parent otherwise (pg_ctl daemonizes postgres; mlflow server runs in its own session).
_LIVE: set = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE):
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _pg_bin_dir() -> Path | None:
    """The directory holding initdb/pg_ctl/postgres: $DEITLAB_PG_BIN, else the newest /usr/lib/postgresql/N/bin,
    else wherever pg_ctl is on PATH (Debian's PATH only has wrappers, not pg_ctl itself)."""
    candidates: list[Path] = []
    if os.environ.get("DEITLAB_PG_BIN"):
        candidates.append(Path(os.environ["DEITLAB_PG_BIN"]))

    def major(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=major, reverse=True)
    if shutil.which("pg_ctl"):
        candidates.append(Path(shutil.which("pg_ctl")).resolve().parent)
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in _PG_TOOLS):
            return directory
    return None


def _as_root() -> bool:
    return os.geteuid() == 0


def postgres_available() -> str | None:
    """None when a PostgreSQL server can be started here, else a one-line reason to skip."""
    if _pg_bin_dir() is None:
        return "PostgreSQL server binaries not found (Debian package postgresql; or set DEITLAB_PG_BIN)"
    if _as_root():
        try:
            pwd.getpwnam(PG_OS_USER)
        except KeyError:
            return f"running as root and there is no '{PG_OS_USER}' OS user to run the PostgreSQL server as"
        if shutil.which("runuser") is None:
            return "running as root and runuser (util-linux) is missing: cannot run PostgreSQL as a non-root user"
    return None


class Postgres:
    """A fresh PostgreSQL cluster in a temp dir, listening on 127.0.0.1:`port`, with an empty database `dbname`.

    Attributes: `.uri` (SQLAlchemy, for mlflow: "postgresql+psycopg2://postgres@127.0.0.1:PORT/mlflow"), `.dsn`
    (libpq, for psql/psycopg2.connect: "postgresql://postgres@127.0.0.1:PORT/mlflow"), `.port`, `.dir` (temp dir:
    data/, postgres.log, the unix socket), `.data_dir`, `.log_path`, `.bin_dir`. `start()`/`stop()` or use it as a
    context manager. `stop()` removes the dir unless `keep=True` was given; with keep=True, start() after stop()
    restarts the same cluster on the same port (a database outage).
    """

    def __init__(self, dbname: str = "mlflow", port: int | None = None, base_dir: str | Path | None = None,
                 keep: bool = False):
        reason = postgres_available()
        if reason:
            raise RuntimeError(reason)
        self.dbname = dbname
        self.port = port or free_port()
        self.bin_dir = _pg_bin_dir()
        self._base_dir = base_dir
        self.keep = keep
        self.dir: Path | None = None
        self._running = False

    # -- paths and commands -------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.dir / "postgres.log"

    @property
    def dsn(self) -> str:
        """libpq URI (psql, psycopg2.connect)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.dbname}"

    @property
    def uri(self) -> str:
        """SQLAlchemy URI (mlflow's --backend-store-uri). The driver is explicit: SQLAlchemy 2.1 maps a bare
        postgresql:// to psycopg (3), which is not installed; psycopg2-binary is (test extra)."""
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{self.dbname}"

    def _run(self, tool: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / tool), *args]
        if _as_root():
            cmd = ["runuser", "-u", PG_OS_USER, "--", *cmd]
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        # cwd: the server user must be able to enter it (root's cwd often is not readable by postgres).
        result = subprocess.run(cmd, cwd=self.dir, env=env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed (exit {result.returncode}): {(result.stdout + result.stderr).strip()}"
                               f"\n--- postgres.log ---\n{_log_tail(self.log_path)}")
        return result

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> "Postgres":
        if self._running:
            return self
        fresh = self.dir is None
        if fresh:
            self.dir = Path(tempfile.mkdtemp(prefix="deitlab-pg-", dir=self._base_dir))
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        try:
            if fresh:
                if _as_root():
                    user = pwd.getpwnam(PG_OS_USER)
                    os.chown(self.dir, user.pw_uid, user.pw_gid)
                self._check_reachable()
                self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                          "--locale=C", "--no-sync", "--no-instructions")
            self._run("pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_path), "-w", "-t", "60",
                      "-o", options)
            self._running = True
            _LIVE.add(self)
            if not self._database_exists():
                self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", self.dbname)
        except BaseException:
            self.stop()
            raise
        return self

    def _check_reachable(self) -> None:
        """As root the cluster runs as `postgres`, which must be able to reach the temp dir through its parents."""
        if not _as_root():
            return
        probe = subprocess.run(["runuser", "-u", PG_OS_USER, "--", "test", "-w", str(self.dir)],
                               capture_output=True)
        if probe.returncode != 0:
            raise RuntimeError(f"the '{PG_OS_USER}' OS user cannot write {self.dir} (a parent dir is not "
                               "traversable); pass base_dir= a world-traversable directory such as /tmp")

    def _database_exists(self) -> bool:
        result = self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                           "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{self.dbname}'")
        return result.stdout.strip() == "1"

    def stop(self) -> None:
        """Stop the server (fast shutdown) and, unless keep=True, remove its directory."""
        if self.dir is None:
            return
        if self._running or (self.data_dir / "postmaster.pid").exists():  # as root: readable though not ours
            try:
                self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60")
            except (RuntimeError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", "-w", "-t", "30")
            self._running = False
        _LIVE.discard(self)
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "Postgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# What a client of a proxied-artifact server (this process, Ray workers) needs in its environment. MLflow 3.17's
# server advertises multipart_uploads/downloads_enabled in /api/3.0/mlflow/server-info whenever its artifact store is
# S3 -- whatever these variables say in the server's environment -- and a client that has them unset follows that
# advertisement: it downloads every artifact (and uploads large ones) through presigned S3 URLs, straight from/to the
# S3 endpoint the server sees, instead of through the server. Set to false, the client always goes through the proxy.
CLIENT_ENV = {"MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false", "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}


def create_bucket(s3_endpoint: str, bucket: str) -> None:
    """Create `bucket` on the S3 endpoint ("host:port"), if it is not there yet."""
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://{s3_endpoint}", region_name="us-east-1")
    try:
        client.head_bucket(Bucket=bucket)
    except client.exceptions.ClientError:
        client.create_bucket(Bucket=bucket)


class MlflowServer:
    """`mlflow server` with `backend_store_uri` as its tracking/registry store, proxying artifacts to
    s3://`bucket`/`prefix` on the S3 endpoint `s3_endpoint` ("host:port", e.g. the moto server of the `s3_endpoint`
    fixture), on 127.0.0.1:`port` (a free one by default; kept across stop()/start()).

    Clients should run with `client_env()` (see CLIENT_ENV). Attributes: `.uri` ("http://127.0.0.1:PORT"), `.port`,
    `.artifacts_destination`, `.dir` (temp dir), `.log_path` (the server's stdout+stderr, every start appended),
    `.proc`, `.last_start_s` (seconds the last start() took until /health answered). `start()` waits until GET
    /health answers; `stop()` terminates the process group and waits until the port is closed; `start()` again
    restarts on the same port. `close()` = stop() + remove the temp dir (the context manager's exit does that when
    no exception is passing; else it keeps the log).
    """

    def __init__(self, backend_store_uri: str, s3_endpoint: str, bucket: str = "deitlab-mlflow",
                 prefix: str = "mlartifacts", port: int | None = None, workers: int = 1,
                 startup_timeout: float = 420.0, base_dir: str | Path | None = None, extra_env: dict | None = None):
        self.backend_store_uri = backend_store_uri
        self.s3_endpoint = s3_endpoint
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.port = port or free_port()
        self.workers = workers
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self.dir = Path(tempfile.mkdtemp(prefix="deitlab-mlflow-server-", dir=base_dir))
        self.log_path = self.dir / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None
        self.last_start_s: float | None = None
        self._starts = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts_destination(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # the server must not talk to another server
            env.pop(key, None)
        env.update({
            "MLFLOW_S3_ENDPOINT_URL": f"http://{self.s3_endpoint}",
            # Read by clients, not by the server (see CLIENT_ENV); set here too for anything the server spawns.
            **CLIENT_ENV,
            # The huey job runner (GenAI jobs) is a second process tree and slows start-up; tests do not use it.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "PYTHONUNBUFFERED": "1",
        })
        for key, value in {"AWS_ACCESS_KEY_ID": "deitlab-test", "AWS_SECRET_ACCESS_KEY": "deitlab-test",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                           "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}.items():
            env.setdefault(key, value)
        env.update(self.extra_env)
        return env

    def client_env(self) -> dict[str, str]:
        """Environment for a client of this server: MLFLOW_TRACKING_URI plus CLIENT_ENV (proxied transfers only)."""
        return {"MLFLOW_TRACKING_URI": self.uri, **CLIENT_ENV}

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", self.backend_store_uri,
                "--artifacts-destination", self.artifacts_destination,
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)]

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=timeout) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> "MlflowServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        if self._starts == 0:
            create_bucket(self.s3_endpoint, self.bucket)
        if _port_open(self.port):
            raise RuntimeError(f"port {self.port} is already in use; cannot start mlflow server there")
        self._starts += 1
        started = time.monotonic()
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"\n===== start #{self._starts} on port {self.port} =====\n")
            log.flush()
            self.proc = subprocess.Popen(self.command(), env=self.env(), cwd=self.dir, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _LIVE.add(self)
        deadline = started + self.startup_timeout
        while time.monotonic() < deadline:
            if self.healthy():
                self.last_start_s = time.monotonic() - started
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode} before answering /health; "
                                   f"log {self.log_path}:\n{_log_tail(self.log_path)}")
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer {self.uri}/health within {self.startup_timeout:.0f} s; "
                           f"log {self.log_path}:\n{_log_tail(self.log_path)}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group (SIGKILL after `timeout`), then wait until its port is closed."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
            # workers in the group may outlive the leader by a moment
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while _port_open(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.port} still open {timeout:.0f} s after stopping mlflow server")
            time.sleep(0.1)

    def close(self) -> None:
        """stop() and remove the temp dir (the log goes with it)."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the log for the post-mortem
            self.stop()

    def log_tail(self, lines: int = 40) -> str:
        return _log_tail(self.log_path, lines)
