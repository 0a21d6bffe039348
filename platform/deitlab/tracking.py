"""MLflow adapter: experiments, parent/child runs, batched metrics, teacher registry, artifact download.

Only the driver and rank 0 talk to MLflow. Metric logging is batched (one `log_batch` per epoch) and never fails a
training run: a tracking error is reported once as a warning and training goes on.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SpecError

log = logging.getLogger("deitlab.tracking")

SWEEP_TAG = "deitlab.sweep"
KIND_TAG = "deitlab.kind"  # sweep | trial | teacher | train
TEACHER_ACC_TAG = "deitlab.accuracy"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000
EPOCH_METRIC = "epoch"  # logged with every epoch's metrics: its history says which epochs MLflow has
RESUMED_FROM_TAG = "deitlab.resumed_from"
RESUMES_TAG = "deitlab.resumes"
DIVERGED_TAG = "deitlab.diverged"  # why a run stopped early: its loss became NaN/Inf
STOPPED_TAG = "deitlab.stopped_early"  # why a sweep's scheduler (ASHA) stopped a trial
# Run fields that may differ when a run is resumed: how it is executed. (More workers also means a larger global
# batch; with optim.lr_base_batch the learning rate follows it.)
RESUMABLE_CHANGES = frozenset({"run.workers", "run.cpus_per_worker", "run.gpus_per_worker", "run.torch_threads",
                               "run.max_failures", "run.placement", "run.checkpoint_every", "run.keep_checkpoints"})


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _stringify(value: Any) -> str:
    text = "None" if value is None else str(value)
    return text[:MAX_PARAM_LENGTH]


@dataclass(frozen=True)
class Tracking:
    """Where runs go: a tracking URI, an experiment name, and (for local stores) an artifact root."""

    tracking_uri: str
    experiment: str
    artifact_root: str | None = None

    @classmethod
    def for_run(cls, run) -> Tracking:
        """From a RunSpec: the given tracking URI, or a SQLite store + artifact dir inside the work directory."""
        if run.tracking_uri:
            return cls(run.tracking_uri, run.experiment)
        run.workdir_path.mkdir(parents=True, exist_ok=True)
        return cls(run.resolved_tracking_uri, run.experiment, (run.workdir_path / "mlartifacts").as_uri())

    @property
    def client(self):
        return _client(self.tracking_uri)

    # ------------------------------------------------------------------------------------------- runs
    def experiment_id(self, create: bool = True) -> str | None:
        """The experiment's id, created once by the driver (concurrent first creation of SQLite stores races)."""
        client = self.client
        try:
            found = client.get_experiment_by_name(self.experiment)
        except Exception as err:  # unreachable server, bad URI, locked or corrupt store
            raise SpecError(f"tracking URI '{self.tracking_uri}': {_one_line(err)}") from None
        if found is not None:
            return found.experiment_id
        if not create:
            return None
        return client.create_experiment(self.experiment, artifact_location=self.artifact_root)

    def start_run(self, name: str, *, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
                  parent_id: str | None = None) -> str:
        client = self.client
        all_tags = dict(tags or {})
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        run = client.create_run(self.experiment_id(), run_name=name, tags=all_tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _stringify(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> bool:
        """One batched call per step. Returns False (and warns) instead of raising when the store is unreachable."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(v)]
        try:
            self.client.log_batch(run_id, metrics=items)
            return True
        except Exception as err:
            log.warning("MLflow logging failed at step %s (%s); training continues", step, _one_line(err))
            return False

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, _stringify(v)) for k, v in tags.items()])

    def try_set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """set_tags for workers and callbacks: a tracking error is a warning, never a failed run."""
        try:
            self.set_tags(run_id, tags)
        except Exception as err:
            log.warning("MLflow tags not recorded (%s)", _one_line(err))

    def logged_epochs(self, run_id: str) -> set[int]:
        """Epochs already in the run's metric history (rank 0 reads this on every start, so none is logged twice)."""
        try:
            return {int(m.step) for m in self.client.get_metric_history(run_id, EPOCH_METRIC)}
        except Exception as err:
            log.warning("could not read the run's logged epochs (%s); epochs may be logged again", _one_line(err))
            return set()

    def record_resume(self, run_id: str, checkpoint: str, epoch: int) -> None:
        try:
            resumes = int(self.client.get_run(run_id).data.tags.get(RESUMES_TAG, "0")) + 1
        except Exception:
            resumes = 1
        self.try_set_tags(run_id, {RESUMED_FROM_TAG: f"{checkpoint} (epoch {epoch})", RESUMES_TAG: resumes})

    def resumable_run(self, name: str, params: dict[str, Any], run_id: str | None = None):
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
                raise SpecError(f"--resume: cannot search for run '{name}': {_one_line(err)}") from None
            if not found:
                raise SpecError(f"--resume: no unfinished run '{name}' in experiment '{self.experiment}'")
            run = found[0]
        if run.data.tags.get(KIND_TAG) != "train" or run.info.run_name != name:
            raise SpecError(f"--resume: run {run.info.run_id} is not a `deitlab train` run of '{name}'")
        if run.info.status == "FINISHED":
            raise SpecError(f"--resume: run {run.info.run_id} has already finished")
        changed = sorted(k for k, v in params.items()
                         if k not in RESUMABLE_CHANGES and run.data.params.get(k) != _stringify(v))
        if changed:
            shown = ", ".join(f"{k} ({run.data.params.get(k)} -> {_stringify(params[k])})" for k in changed[:4])
            raise SpecError(f"--resume: the spec differs from run {run.info.run_id} in {shown}; resume with the spec"
                            " the run started with")
        return run

    def reopen_run(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def end_if_running(self, run_id: str, status: str) -> None:
        """End the run unless someone already did (the sweep driver ends a trial that ASHA stopped, as KILLED)."""
        try:
            if self.client.get_run(run_id).info.status != "RUNNING":
                return
        except Exception:
            pass
        self.end_run(run_id, status)

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(local_path), artifact_path)

    # ------------------------------------------------------------------------------------------- registry
    def register_teacher(self, run_id: str, artifact_path: str, name: str, accuracy: float) -> str:
        """Register the run's model file as a new version of `name`; returns the version's models:/ URI."""
        client = self.client
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(name, tags={KIND_TAG: "teacher"},
                                           description="deitlab teacher: a deitlab.model/1 file (torch state_dict)")
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        version = client.create_model_version(name, source, run_id=run_id,
                                              tags={TEACHER_ACC_TAG: f"{accuracy:.6f}"},
                                              description=f"validation accuracy {accuracy:.4f}")
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
            raise SpecError(f"teacher URI '{uri}': {_one_line(err)}") from None

    def latest_version(self, name: str):
        """The newest registered version of `name`."""
        versions = self.client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise SpecError(f"registered model '{name}' has no versions at '{self.tracking_uri}'")
        return max(versions, key=lambda v: int(v.version))

    def model_source(self, uri: str) -> str:
        """The artifact location behind models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS.

        Resolved with our own client so the registry is the one at our tracking URI, not a process-global default.
        """
        ref = uri.removeprefix("models:/").strip("/")
        name, _, version = ref.rpartition("/")
        if "@" not in ref and not name:
            raise SpecError(f"teacher URI '{uri}': expected models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS")
        try:
            client = self.client
            if "@" in ref:
                return client.get_model_version_by_alias(*ref.split("@", 1)).source
            if version == "latest":
                return self.latest_version(name).source
            return client.get_model_version(name, version).source
        except SpecError:
            raise
        except Exception as err:
            raise SpecError(f"teacher URI '{uri}': {_one_line(err)}") from None

    # ------------------------------------------------------------------------------------------- artifacts
    def log_json(self, run_id: str, name: str, payload: Any) -> None:
        """Write `payload` as the run's artifact `name` (replacing an earlier one of that name)."""
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            self.log_artifact(run_id, path)

    def read_json(self, run_id: str, name: str) -> Any:
        import json
        import tempfile

        import mlflow.artifacts

        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=tmp,
                                                           tracking_uri=self.tracking_uri)
                return json.loads(Path(path).read_text(encoding="utf-8"))
            except Exception as err:
                raise SpecError(f"run {run_id}: cannot read its artifact '{name}': {_one_line(err)}") from None

    # ------------------------------------------------------------------------------------------- queries
    def sweep_parent(self, sweep: str):
        """The newest parent run of the sweep called `sweep` in this experiment."""
        experiment_id = self.experiment_id(create=False)
        if experiment_id is None:
            raise SpecError(f"no MLflow experiment '{self.experiment}' at '{self.tracking_uri}'")
        parents = self.client.search_runs([experiment_id], _sweep_filter(sweep),
                                          order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise SpecError(f"no sweep '{sweep}' in experiment '{self.experiment}' at '{self.tracking_uri}'")
        return parents[0]

    def sweep_experiment(self, sweep: str) -> str | None:
        """The experiment that holds the newest sweep called `sweep`, searching all of the store's experiments."""
        client = self.client
        try:
            ids = [e.experiment_id for e in client.search_experiments()]
        except Exception as err:
            raise SpecError(f"tracking URI '{self.tracking_uri}': {_one_line(err)}") from None
        found = client.search_runs(ids, _sweep_filter(sweep), order_by=["attributes.start_time DESC"],
                                   max_results=1) if ids else []
        return client.get_experiment(found[0].info.experiment_id).name if found else None

    def child_runs(self, parent_id: str) -> list:
        """The parent's child runs, oldest first."""
        run = self.client.get_run(parent_id)
        children = self.client.search_runs([run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                           max_results=5000, order_by=["attributes.start_time ASC"])
        return list(children)

    def sweep_runs(self, sweep: str):
        """(parent run, [child runs]) of the newest sweep called `sweep` in this experiment."""
        parent = self.sweep_parent(sweep)
        return parent, self.child_runs(parent.info.run_id)


def _sweep_filter(sweep: str) -> str:
    """MLflow's search filter for the parent runs of the sweep called `sweep`."""
    quoted = sweep.replace("'", "")
    return f"tags.`{SWEEP_TAG}` = '{quoted}' and tags.`{KIND_TAG}` = 'sweep'"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] if text else type(err).__name__


def quiet_mlflow() -> None:
    """MLflow prints alembic migrations and hints on every new store; keep the user's terminal for our progress."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
