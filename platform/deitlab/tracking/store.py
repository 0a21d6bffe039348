"""MLflow adapter: experiments, parent/child runs, buffered metrics, teacher registry, artifacts.

Only the driver and rank 0 talk to MLflow. Rank 0 logs metrics through `MetricLogger`: a background thread sends
batches, and while the tracking server is unreachable the values wait in memory and then in a spill file, so training
never waits for MLflow and no value is dropped. Every param, tag and JSON artifact passes through `redact` first.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deitlab.errors import SpecError, one_line
from deitlab.tracking.logger import MetricLogger, MetricsRefused, finite_metrics
from deitlab.tracking.names import (
    EPOCH_METRIC,
    GIT_ENV,
    KIND_TAG,
    MAX_PARAM_LENGTH,
    PARENT_TAG,
    RESUMED_FROM_TAG,
    RESUMES_TAG,
    SWEEP_TAG,
    TEACHER_ACC_TAG,
)
from deitlab.tracking.redact import scrub_item, scrub_tree

log = logging.getLogger("deitlab.tracking")


# Run fields that may differ when a run is resumed: how it is executed. (More workers also means a larger global
# batch; with optim.lr_base_batch the learning rate follows it.)
RESUMABLE_CHANGES = frozenset({"run.workers", "run.cpus_per_worker", "run.gpus_per_worker", "run.torch_threads",
                               "run.max_failures", "run.placement", "run.checkpoint_every", "run.keep_checkpoints",
                               "run.log_every_steps"})


RESUMABLE_PREFIXES = ("run.resources.",)  # custom Ray resources, flattened one param per resource


def check_tracking_server(uri: str, timeout: float = 10.0) -> None:
    """A tracking server (http/https URI) answers and accepts this environment's credentials (MLFLOW_TRACKING_USERNAME
    / _PASSWORD, or MLFLOW_TRACKING_TOKEN): one request, no retries, before Ray starts or anything is written.
    MLflow's client would retry an unreachable server for minutes."""
    import base64
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            given = f"user '{user}'" if user and password else "no MLFLOW_TRACKING_USERNAME / _PASSWORD"
            raise SpecError(f"MLflow at {uri} refused the credentials (HTTP {err.code}, {given}): set"
                            " MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
        # another status (an old server, a proxy's quirk): MLflow's own client decides later
    except (OSError, ValueError) as err:
        raise SpecError(f"MLflow at {uri}: cannot reach the tracking server ({one_line(err, 200)})") from None


def _create_sqlite_store(tracking_uri: str) -> None:
    """Create a new SQLite store whole, then put it in place: MLflow builds its tables by migrations, and another
    process that opens the file meanwhile (a trial, `deitlab sweep status`, `mlflow ui`) runs them too and one of the
    two fails (duplicate column). An existing store file is then always a complete one."""
    if not tracking_uri.startswith("sqlite:///"):
        return
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    if path.exists() or not path.parent.is_dir():
        return
    from mlflow import MlflowClient

    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    MlflowClient(f"sqlite:///{partial}").search_experiments(max_results=1)  # creates and migrates it
    try:
        os.link(partial, path)  # never replaces a store another process put there first
    except FileExistsError:
        pass
    finally:
        partial.unlink(missing_ok=True)


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    # A server that proxies S3 artifacts still offers presigned S3 URLs for multipart transfers; clients that cannot
    # reach the bucket themselves (the usual reason to proxy) then fail. Every transfer goes through the server.
    os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "false")
    os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    _s3_endpoint_for_mlflow()
    _create_sqlite_store(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _recorded(name: str, value: Any) -> str:
    """What MLflow records for the param or tag `name`: secrets redacted, cut to MLflow's length limit."""
    return scrub_item(name, value)[:MAX_PARAM_LENGTH]


@functools.lru_cache(maxsize=1)  # asked once per process, not per run
def git_commit() -> str | None:
    """The commit of the deitlab checkout that runs (`+dirty` with uncommitted changes), or DEITLAB_GIT_COMMIT."""
    if os.environ.get(GIT_ENV):
        return os.environ[GIT_ENV]
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # an installed wheel, or no git
    return commit + ("+dirty" if dirty else "") if commit else None


# ------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class RunRecord:
    """One tracked run as deitlab reads it back: what the sweep driver, `sweep status`, `report` and the CLI use. The
    tracking backend's own run objects stay inside this module."""

    id: str
    name: str
    status: str  # RUNNING | FINISHED | FAILED | KILLED | SCHEDULED
    experiment_id: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]  # each metric's latest value
    artifact_uri: str = ""
    start_time: int = 0  # ms since the epoch


@dataclass(frozen=True)
class MetricPoint:
    step: int
    value: float
    timestamp: int  # ms since the epoch


@dataclass(frozen=True)
class VersionRecord:
    """A registered model version: its number, tags and where its files are."""

    name: str
    version: str
    tags: dict[str, str]
    source: str


@dataclass(frozen=True)
class DatasetRecord:
    """A run's input data as MLflow records it (the UI's Dataset column, "group by dataset", dataset search): one per
    split, `context` train or eval; `digest` deitlab's fingerprint of that split, so runs on the same data match."""

    name: str
    digest: str
    context: str  # train | eval
    source: str | None  # the path or URI the data came from; None: built in (digits, synthetic)
    profile: dict[str, Any]  # e.g. {"num_rows": 1437, "num_classes": 10}


@dataclass(frozen=True)
class LoggedModelRecord:
    """An MLflow logged model (MLflow 3): its id, models:/ URI and where its files are."""

    model_id: str
    artifact_location: str

    @property
    def uri(self) -> str:
        return f"models:/{self.model_id}"


MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # MLflow's tag of a logged model: the registry versions made from it


MODEL_TYPE = "deitlab.model/1"  # a torch state_dict file read with torch.load(weights_only=True), never pickled code


def _run_record(run) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.run_name, run.info.status, run.info.experiment_id,
                     dict(run.data.params), dict(run.data.tags), dict(run.data.metrics), run.info.artifact_uri or "",
                     run.info.start_time or 0)


def _version_record(version) -> VersionRecord:
    return VersionRecord(version.name, str(version.version), dict(version.tags or {}), version.source)


@dataclass(frozen=True)
class Tracking:
    """Where runs go: a tracking URI, an experiment name, and (for local stores) an artifact root."""

    tracking_uri: str
    experiment: str
    artifact_root: str | None = None
    read_only: bool = False  # the preflight's: never creates a store (or its work directory)

    @classmethod
    def for_run(cls, run) -> Tracking:
        """From a RunSpec: the given tracking URI, or a SQLite store + artifact dir inside the work directory.

        `run.artifacts` (a directory or s3://bucket/prefix) is where a new experiment keeps its artifacts; a tracking
        server with its own artifact root needs none.
        """
        _s3_endpoint_for_mlflow()
        if run.tracking_uri:
            return cls(run.tracking_uri, run.experiment, run.artifacts)
        run.workdir_path.mkdir(parents=True, exist_ok=True)
        return cls(run.resolved_tracking_uri, run.experiment,
                   run.artifacts or (run.workdir_path / "mlartifacts").as_uri())

    @classmethod
    def reader(cls, run) -> Tracking:
        """for_run, but only to read what is recorded: a SQLite store that does not exist is not created (asking it
        for a run or a registered model is then one line)."""
        if run.tracking_uri:
            return cls(run.tracking_uri, run.experiment, run.artifacts, read_only=True)
        return cls(run.resolved_tracking_uri, run.experiment, read_only=True)

    @property
    def client(self):
        if self.read_only and self.tracking_uri.startswith("sqlite:///"):
            path = Path(self.tracking_uri.removeprefix("sqlite:///"))
            if not path.is_file():
                raise SpecError(f"no MLflow store at {path} yet (nothing was recorded there): give the --workdir or"
                                " run.tracking_uri where the model or run was recorded")
        return _client(self.tracking_uri)

    # ------------------------------------------------------------------------------------------- runs
    def run(self, run_id: str) -> RunRecord:
        return _run_record(self.client.get_run(run_id))

    def metric_history(self, run_id: str, key: str) -> list[MetricPoint]:
        return [MetricPoint(int(m.step), float(m.value), int(m.timestamp))
                for m in self.client.get_metric_history(run_id, key)]

    def experiment_id(self, create: bool = True) -> str | None:
        """The experiment's id, created once by the driver (concurrent first creation of SQLite stores races)."""
        client = self.client
        try:
            found = client.get_experiment_by_name(self.experiment)
        except Exception as err:  # unreachable server, bad URI, locked or corrupt store
            raise SpecError(f"tracking URI '{self.tracking_uri}': {one_line(err)}") from None
        if found is not None:
            return found.experiment_id
        if not create:
            return None
        return client.create_experiment(self.experiment, artifact_location=self.artifact_root)

    def artifact_location(self) -> str | None:
        try:
            found = self.client.get_experiment_by_name(self.experiment)
        except Exception:
            return None
        return found.artifact_location if found else None

    def start_run(self, name: str, *, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
                  parent_id: str | None = None) -> str:
        client = self.client
        all_tags = dict(tags or {})
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        run = client.create_run(self.experiment_id(), run_name=name,
                                tags={k: _recorded(k, v) for k, v in all_tags.items()})
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _recorded(k, v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """One batched call (raises when the store is unreachable; rank 0 uses MetricLogger instead)."""
        self.client.log_batch(run_id, metrics=metric_entities(metrics, step))

    def fill_missing_epochs(self, run_id: str, history: list[dict[str, float]]) -> int:
        """Log the epochs of `history` that the run's metrics lack (the workers could not deliver them: the tracking
        server was down when they ended). Returns how many epochs were filled in."""
        have = self.logged_epochs(run_id, strict=True)
        missing = [m for m in history if int(m["epoch"]) not in have]
        for metrics in missing:
            self.log_metrics(run_id, metrics, step=int(metrics["epoch"]))
        return len(missing)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, _recorded(k, v)) for k, v in tags.items()])

    def try_set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """set_tags for workers and callbacks: a tracking error is a warning, never a failed run."""
        try:
            self.set_tags(run_id, tags)
        except Exception as err:
            log.warning("MLflow tags not recorded (%s)", one_line(err))

    def logged_epochs(self, run_id: str, strict: bool = False) -> set[int]:
        """Epochs already in the run's metric history (rank 0 reads this on every start, so none is logged twice)."""
        try:
            return {m.step for m in self.metric_history(run_id, EPOCH_METRIC)}
        except Exception as err:
            if strict:
                raise
            log.warning("could not read the run's logged epochs (%s); epochs may be logged again", one_line(err))
            return set()

    def record_resume(self, run_id: str, checkpoint: str, epoch: int) -> None:
        try:
            resumes = int(self.run(run_id).tags.get(RESUMES_TAG, "0")) + 1
        except Exception:
            resumes = 1
        self.try_set_tags(run_id, {RESUMED_FROM_TAG: f"{checkpoint} (epoch {epoch})", RESUMES_TAG: resumes})

    def resumable_run(self, name: str, params: dict[str, Any], run_id: str | None = None) -> RunRecord:
        """The run `--resume` continues: `run_id`, or the newest unfinished `train` run called `name`.

        Its recorded params must match the spec, except how it is executed (RESUMABLE_CHANGES).
        """
        experiment_id = self.experiment_id(create=False)
        if experiment_id is None:
            raise SpecError(f"--resume: no MLflow experiment '{self.experiment}' at '{self.tracking_uri}'")
        client = self.client
        if run_id:
            try:
                run = client.get_run(run_id)
            except Exception:
                raise SpecError(f"--resume: no MLflow run '{run_id}' at '{self.tracking_uri}'") from None
        else:
            quoted = f'"{name}"' if "'" in name else f"'{name}'"
            try:
                found = client.search_runs([experiment_id], f"attributes.run_name = {quoted} and"
                                           f" tags.`{KIND_TAG}` = 'train' and attributes.status != 'FINISHED'",
                                           order_by=["attributes.start_time DESC"], max_results=1)
            except Exception as err:  # a name MLflow's filter syntax cannot quote
                raise SpecError(f"--resume: cannot search for run '{name}': {one_line(err)}") from None
            if not found:
                raise SpecError(f"--resume: no unfinished run '{name}' in experiment '{self.experiment}'")
            run = found[0]
        run = _run_record(run)
        if run.tags.get(KIND_TAG) != "train" or run.name != name:
            raise SpecError(f"--resume: run {run.id} is not a `deitlab train` run of '{name}'")
        if run.status == "FINISHED":
            raise SpecError(f"--resume: run {run.id} has already finished")
        changed = sorted(k for k, v in params.items()
                         if k not in RESUMABLE_CHANGES and not k.startswith(RESUMABLE_PREFIXES)
                         and run.params.get(k) != _recorded(k, v))
        if changed:
            shown = ", ".join(f"{k} ({run.params.get(k)} -> {_recorded(k, params[k])})" for k in changed[:4])
            raise SpecError(f"--resume: the spec differs from run {run.id} in {shown}; resume with the spec"
                            " the run started with")
        return run

    def reopen_run(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def end_if_running(self, run_id: str, status: str) -> None:
        """End the run unless someone already did (the sweep driver ends a trial that ASHA stopped, as KILLED)."""
        try:
            if self.run(run_id).status != "RUNNING":
                return
        except Exception:
            pass
        self.end_run(run_id, status)

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(local_path), artifact_path)

    # ------------------------------------------------------------------------------------------- datasets, models
    def log_datasets(self, run_id: str, datasets: list[DatasetRecord]) -> None:
        """Record the run's input datasets (MLflow keeps each (dataset, context) of a run once: a resumed run that
        logs them again adds nothing)."""
        import warnings

        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for record in datasets:
            if record.source:
                with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local kind
                    warnings.simplefilter("ignore")
                    source = resolve_dataset_source(scrub_item("source", record.source))
            else:
                source = CodeDatasetSource({"deitlab.dataset": record.name.split("/")[0]})
            entity = Dataset(record.name, record.digest, source._get_source_type(), source.to_json(),
                             profile=json.dumps(record.profile, sort_keys=True))
            inputs.append(DatasetInput(entity, [InputTag("mlflow.data.context", record.context)]))
        self.client.log_inputs(run_id, datasets=inputs)

    def log_model(self, run_id: str, files: list[Path], name: str, *, metrics: dict[str, float] | None = None,
                  step: int = 0, params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None,
                  dataset: DatasetRecord | None = None) -> LoggedModelRecord:
        """An MLflow logged model of the run (its "Logged models"; the experiment's Models tab) holding `files`,
        with `params`, `tags` and `metrics`: the run's own values at `step` (see _as_logged), linked to the model and
        to the data they were measured on. Its files are its own: the run's artifacts do not repeat them."""
        from mlflow.entities import LoggedModelOutput, Metric

        client = self.client
        model = client.create_logged_model(self.run(run_id).experiment_id, name=name, source_run_id=run_id,
                                           tags={k: _recorded(k, v) for k, v in (tags or {}).items()},
                                           params={k: _recorded(k, v) for k, v in (params or {}).items()},
                                           model_type=MODEL_TYPE)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                for path in files:  # one upload of a folder: the model's files at its root
                    try:
                        os.link(path, Path(tmp) / path.name)  # no copy of a large file on the same file system
                    except OSError:
                        shutil.copyfile(path, Path(tmp) / path.name)
                client.log_model_artifacts(model.model_id, tmp)
            client.finalize_logged_model(model.model_id, "READY")
        except BaseException:
            client.finalize_logged_model(model.model_id, "FAILED")
            raise
        linked = {"dataset_name": dataset.name, "dataset_digest": dataset.digest} if dataset else {}
        values = [Metric(k, v, ts, step, model_id=model.model_id, **linked)
                  for k, (v, ts) in self._as_logged(run_id, finite_metrics(metrics or {}), step).items()]
        if values:
            client.log_batch(run_id, metrics=values)
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        return LoggedModelRecord(model.model_id, model.artifact_location)

    def _as_logged(self, run_id: str, metrics: dict[str, float], step: int) -> dict[str, tuple[float, int]]:
        """(value, timestamp) of each metric as the run logged it at `step`, else (the value given, now). A model's
        metric logged with the run's own value and timestamp is one point in the run's history, not two: MLflow keeps
        a (key, step, value, timestamp) once."""
        now, out = int(time.time() * 1000), {}
        for key, value in metrics.items():
            point = next((p for p in self.metric_history(run_id, key) if p.step == step), None)
            out[key] = (point.value, point.timestamp) if point else (value, now)
        return out

    # ------------------------------------------------------------------------------------------- registry
    def register_teacher(self, run_id: str, model: LoggedModelRecord, name: str, accuracy: float | None,
                         tags: dict[str, Any] | None = None, alias: str | None = None) -> str:
        """Register the run's logged teacher model as a new version of `name` with `tags` (architecture, family,
        size, data fingerprint) and optionally move `alias` to it; returns the version's models:/ URI. The version's
        source is the logged model (models:/m-…): its page links that model, whose page shows its metrics and this
        version."""
        client = self.client
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(name, tags={KIND_TAG: "teacher"},
                                           description="deitlab teacher: a deitlab.model/1 file (torch state_dict)")
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        version_tags = {k: _recorded(k, v) for k, v in (tags or {}).items()}
        if accuracy is not None:
            version_tags[TEACHER_ACC_TAG] = f"{accuracy:.6f}"
        described = f"validation accuracy {accuracy:.4f}" if accuracy is not None else \
            str(version_tags.get("accuracy_note", "accuracy not measured"))
        with _default_tracking_uri(self.tracking_uri):
            version = client.create_model_version(name, model.uri, run_id=run_id, tags=version_tags,
                                                  description=described, model_id=model.model_id)
        # what the logged model's page lists as its registered versions (MLflow's own register_model sets it too)
        registered = json.loads(client.get_logged_model(model.model_id).tags.get(MODEL_VERSIONS_TAG, "[]"))
        client.set_logged_model_tags(model.model_id, {MODEL_VERSIONS_TAG: json.dumps(
            [*registered, {"name": name, "version": str(version.version)}])})
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
        return f"models:/{name}/{version.version}"

    def download(self, uri: str, dst: str | Path) -> Path:
        """Download a models:/ or runs:/ URI (or any artifact URI) to dst; a bad URI is a SpecError."""
        import mlflow.artifacts

        Path(dst).mkdir(parents=True, exist_ok=True)
        try:
            source = self.model_source(uri) if uri.startswith("models:/") else uri
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                            tracking_uri=self.tracking_uri))
        except SpecError:
            raise
        except Exception as err:
            raise SpecError(f"teacher URI '{uri}': {one_line(err)}") from None

    def latest_version(self, name: str) -> VersionRecord:
        """The newest registered version of `name`."""
        versions = self.client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise SpecError(f"registered model '{name}' has no versions at '{self.tracking_uri}'")
        return _version_record(max(versions, key=lambda v: int(v.version)))

    def version(self, name: str, version: str) -> VersionRecord:
        return _version_record(self.client.get_model_version(name, version))

    def model_source(self, uri: str) -> str:
        """The artifact location behind models:/NAME/VERSION, models:/NAME/latest, models:/NAME@ALIAS or a logged
        model's models:/m-ID.

        Resolved with our own client so the registry is the one at our tracking URI, not a process-global default.
        A version whose source is a logged model has its files where that model's are (the registry's download URI).
        """
        ref = uri.removeprefix("models:/").strip("/")
        name, _, version = ref.rpartition("/")
        if "@" not in ref and not name and not ref.startswith("m-"):
            raise SpecError(f"teacher URI '{uri}': expected models:/NAME/VERSION, models:/NAME/latest,"
                            " models:/NAME@ALIAS or models:/m-ID (a logged model)")
        try:
            client = self.client
            if "@" in ref:
                name, version = ref.split("@", 1)
                version = client.get_model_version_by_alias(name, version).version
            elif not name:
                return client.get_logged_model(ref).artifact_location
            elif version == "latest":
                version = self.latest_version(name).version
            return client.get_model_version_download_uri(name, version)
        except SpecError:
            raise
        except Exception as err:
            raise SpecError(f"teacher URI '{uri}': {one_line(err)}") from None

    # ------------------------------------------------------------------------------------------- artifacts
    def log_json(self, run_id: str, name: str, payload: Any) -> None:
        """Write `payload` (secrets redacted) as the run's artifact `name`, replacing an earlier one of that name."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            path.write_text(json.dumps(scrub_tree(payload), indent=2, sort_keys=True) + "\n", encoding="utf-8")
            self.log_artifact(run_id, path, str(Path(name).parent) if "/" in name else None)

    def read_json(self, run_id: str, name: str) -> Any:
        import mlflow.artifacts

        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=tmp,
                                                           tracking_uri=self.tracking_uri)
                return json.loads(Path(path).read_text(encoding="utf-8"))
            except Exception as err:
                raise SpecError(f"run {run_id}: cannot read its artifact '{name}': {one_line(err)}") from None

    # ------------------------------------------------------------------------------------------- queries
    def sweep_parent(self, sweep: str) -> RunRecord:
        """The newest parent run of the sweep called `sweep` in this experiment."""
        experiment_id = self.experiment_id(create=False)
        if experiment_id is None:
            raise SpecError(f"no MLflow experiment '{self.experiment}' at '{self.tracking_uri}'")
        parents = self.client.search_runs([experiment_id], _sweep_filter(sweep),
                                          order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise SpecError(f"no sweep '{sweep}' in experiment '{self.experiment}' at '{self.tracking_uri}'")
        return _run_record(parents[0])

    def sweep_experiment(self, sweep: str) -> str | None:
        """The experiment that holds the newest sweep called `sweep`, searching all of the store's experiments."""
        found = self._newest_sweep_parent(sweep)
        return self.client.get_experiment(found.info.experiment_id).name if found else None

    def newest_sweep(self) -> tuple[str, str] | None:
        """(sweep name, experiment name) of the newest sweep in any of the store's experiments, or None."""
        found = self._newest_sweep_parent(None)
        if found is None:
            return None
        return found.data.tags.get(SWEEP_TAG, found.info.run_name), \
            self.client.get_experiment(found.info.experiment_id).name

    def _newest_sweep_parent(self, sweep: str | None):
        """The newest parent run of the sweep called `sweep` (None: of any sweep) in any of the store's experiments."""
        client = self.client
        try:
            ids = [e.experiment_id for e in client.search_experiments()]
        except Exception as err:
            raise SpecError(f"tracking URI '{self.tracking_uri}': {one_line(err)}") from None
        query = _sweep_filter(sweep) if sweep is not None else f"tags.`{KIND_TAG}` = 'sweep'"
        found = client.search_runs(ids, query, order_by=["attributes.start_time DESC"], max_results=1) if ids else []
        return found[0] if found else None

    def child_runs(self, parent_id: str) -> list[RunRecord]:
        """The parent's child runs, oldest first."""
        experiment_id = self.run(parent_id).experiment_id
        children = self.client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                           max_results=5000, order_by=["attributes.start_time ASC"])
        return [_run_record(run) for run in children]

    def sweep_runs(self, sweep: str) -> tuple[RunRecord, list[RunRecord]]:
        """(parent run, [child runs]) of the newest sweep called `sweep` in this experiment."""
        parent = self.sweep_parent(sweep)
        return parent, self.child_runs(parent.id)

    def system_metrics(self, run_ids: list[str], interval_s: float = 5.0, node_id: str | None = None):
        """One MLflow system-metrics monitor (CPU, memory, disk, network; GPU with nvidia-ml-py) for this machine,
        started, whose every sample goes to each of `run_ids` (a pack's members share the machine: sampling it once
        per member would only repeat the same numbers). `node_id` prefixes the names (system/NODE/…) where a run spans
        several nodes. `finish()` records a last sample. None where psutil is missing or the monitor cannot start."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            class FanOut:
                """The monitor's logger for several runs: a sample is stamped once and logged to every run, at that
                run's own next step (a resumed run continues its steps). Sent at every sample: one log_batch per run
                per interval."""

                def __init__(self, client, steps: dict[str, int]):
                    self.client, self.steps, self.data = client, steps, []
                    self.total_training_time = self.total_log_batch_time = 0.0  # MLflow's monitor reads them

                def record_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
                    now = int(time.time() * 1000)
                    for run_id, next_step in self.steps.items():
                        self.data += [(run_id, _metric(k, v, now, next_step)) for k, v in metrics.items()]
                        self.steps[run_id] = next_step + 1
                    self.flush()

                def flush(self) -> None:
                    data, self.data = self.data, []
                    for run_id in self.steps:
                        batch = [m for r, m in data if r == run_id]
                        for i in range(0, len(batch), 1000):  # MLflow's limit per log_batch
                            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

            class FlushingMonitor(SystemMetricsMonitor):
                """MLflow's monitor drops the samples of its last, unfinished interval, so a run shorter than one
                interval would record no system metrics at all: at the end, one more sample is taken and what was
                collected since the last publication is logged. Its loop follows the first run's status."""

                def finish(self):
                    running = self._process is not None
                    super().finish()  # stops and joins the sampling thread, flushes what it queued
                    if running:
                        self.collect_metrics()
                        self.publish_metrics(self.aggregate_metrics())
                        self.mlflow_logger.flush()

            monitor = FlushingMonitor(run_ids[0], sampling_interval=interval_s, node_id=node_id,
                                      tracking_uri=self.tracking_uri)
            # its own client, as MLflow's logger has: the sampling thread shares nothing with the metric logger's
            steps = {r: monitor._get_next_logging_step(r) for r in run_ids}
            monitor.mlflow_logger = FanOut(monitor.mlflow_logger.client, steps)
            monitor.start()
            return monitor
        except Exception as err:
            log.warning("system metrics are not recorded (%s)", one_line(err, 200))
            return None

    def metric_sender(self):
        """A backend-neutral send function for MetricLogger: send(run_id, [(key, value, timestamp_ms, step), ...]);
        raises MetricsRefused when the store refuses the values (retrying cannot help), any other error when it
        cannot be reached."""
        client = self.client

        def send(run_id: str, items: list[tuple]) -> None:
            try:
                client.log_batch(run_id, metrics=[_metric(*item) for item in items])
            except Exception as err:
                if _rejected(err):
                    raise MetricsRefused(one_line(err)) from None
                raise

        return send

    def metric_logger(self, run_id: str, **options) -> MetricLogger:
        return MetricLogger(self.metric_sender(), run_id, **options)


def metric_entities(metrics: dict[str, float], step: int) -> list:
    """MLflow Metric entities for the finite numbers of `metrics`, stamped now."""
    now = int(time.time() * 1000)
    return [_metric(k, v, now, step) for k, v in finite_metrics(metrics).items()]


def _metric(key: str, value: float, timestamp: int, step: int):
    from mlflow.entities import Metric

    return Metric(key, value, timestamp, step)


def _rejected(err: Exception) -> bool:
    code = str(getattr(err, "error_code", ""))
    return any(c in code for c in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"))


def _default_tracking_uri(uri: str):
    """MLflow's registry resolves a models:/m-ID source through a client at the process's default tracking URI, not
    the one it was asked through (a TODO in its SQL store): the default points at ours for that call."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    return _use_tracking_uri(uri)


def _s3_endpoint_for_mlflow() -> None:
    """MLflow's S3 artifact client reads MLFLOW_S3_ENDPOINT_URL; boto3 and pyarrow read AWS_ENDPOINT_URL. One
    variable (AWS_ENDPOINT_URL) serves checkpoints and artifacts alike."""
    if os.environ.get("AWS_ENDPOINT_URL") and not os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"]


def _sweep_filter(sweep: str) -> str:
    """MLflow's search filter for the parent runs of the sweep called `sweep`."""
    quoted = sweep.replace("'", "")
    return f"tags.`{SWEEP_TAG}` = '{quoted}' and tags.`{KIND_TAG}` = 'sweep'"


def quiet_mlflow() -> None:
    """MLflow prints alembic migrations and hints on every new store; keep the user's terminal for our progress."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
