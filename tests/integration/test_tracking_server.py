"""MLflow as teams run it: `mlflow server` on PostgreSQL, artifacts proxied to S3 (a moto server), a teacher registered
with its card and an alias, a sweep against both — then what the UI, the report and a secrets scan see, and a server
outage in the middle of a training run."""
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import PLANTED_AWS_KEY_ID, PLANTED_AWS_SECRET, TINY_STUDENT, s3_client, write_yaml
from deitlab.cli.app import app
from deitlab.data.loaders import data_fingerprint, load_data
from deitlab.spec.base import validate
from deitlab.spec.schema import DataSpec, ExperimentSpec, TeacherTrainingSpec
from deitlab.tracking.names import TEACHER_FAMILY_TAG
from mlflow import MlflowClient
from mlflow.entities import ViewType
from servers import MlflowServer, Postgres, postgres_available
from typer.testing import CliRunner

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(postgres_available() is not None, reason=str(postgres_available()))]

BUCKET = "deitlab-server"
PREFIX = "mlartifacts"
EXPERIMENT = "srv-family"
PLANTED_PASSWORD = "pl4nted-Passw0rd"
PLANTED_TOKEN = "tok-planted-9f8e7d6c5b"
PLANTED = (PLANTED_AWS_KEY_ID, PLANTED_AWS_SECRET, PLANTED_PASSWORD, PLANTED_TOKEN)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(s3_endpoint):
    with Postgres() as postgres, MlflowServer(postgres.uri, s3_endpoint, bucket=BUCKET, prefix=PREFIX) as mlflow:
        yield mlflow


def _storage(s3_endpoint: str) -> str:
    return f"s3://{BUCKET}/checkpoints?endpoint_override={s3_endpoint}&scheme=http"


@pytest.fixture(scope="module")
def tracking_password():
    """MLflow credentials in the environment, as a server with basic auth needs them (this one ignores them)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update({"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": PLANTED_PASSWORD})
    yield PLANTED_PASSWORD
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def server_sweep(ray_session, server, s3_endpoint, tracking_password, tmp_path_factory):
    """A teacher registered on the server (alias `champion`) and a 3-trial sweep (none, soft, hard) that uses it.

    Secrets are planted: AWS keys and an MLflow password in the environment, and in the spec's run tags an AWS key
    id, a token and the AWS secret itself.
    """
    from deitlab.orchestration.train import train_teacher

    tmp = tmp_path_factory.mktemp("server-sweep")
    uri = server.uri
    run = {"tracking_uri": uri, "workdir": str(tmp), "storage": _storage(s3_endpoint),
           "tags": {"ticket": f"see {PLANTED_AWS_KEY_ID}", "api_token": PLANTED_TOKEN,
                    "note": f"key={PLANTED_AWS_SECRET}"}}
    teacher = train_teacher(TeacherTrainingSpec(name="srv-convnet", arch="test_resnet", alias="champion",
                                                optim={"epochs": 2}, run={**run, "experiment": "srv-teachers"}))
    raw = {"name": "srv-sweep", "max_concurrent": 2, "seeds": [0],
           "teachers": {"convnet": {"uri": "models:/srv-convnet@champion"}},
           "grid": {"distillation.mode": ["none", "soft", "hard"], "teacher": ["convnet"]},
           "experiment": {"name": "srv-student", "student": TINY_STUDENT, "optim": {"epochs": 2, "warmup_epochs": 0},
                          "run": {**run, "experiment": EXPERIMENT, "log_every_steps": 10}}}
    path = write_yaml(tmp / "sweep.yaml", json.dumps(raw))
    result = CliRunner().invoke(app, ["sweep", "run", str(path)])
    assert result.exit_code == 0, result.output
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    [parent] = [r for r in runs if r.data.tags.get("deitlab.kind") == "sweep"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return {"client": client, "experiment": experiment, "parent": parent, "children": children, "teacher": teacher,
            "uri": uri, "tmp": tmp}


def _bucket_keys(s3_endpoint: str, prefix: str = "") -> list[str]:
    pages = s3_client(s3_endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def test_runs_are_structured_for_comparing_teachers(server_sweep, s3_endpoint):
    client, parent, children = server_sweep["client"], server_sweep["parent"], server_sweep["children"]
    assert server_sweep["experiment"].artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert tags["deitlab.sweep"] == "srv-sweep" and len(tags["deitlab.spec_hash"]) == 16
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head:
        assert tags["mlflow.source.git.commit"].startswith(head)
    assert {"sweep.json", "summary/report.html", "summary/report.md", "summary/report.json"} <= set(
        _artifacts(client, parent.info.run_id))

    assert sorted(children) == ["hard-convnet-s0", "none-s0", "soft-convnet-s0"]
    validation_images = load_data(DataSpec()).sizes[1]
    system_metrics = set()
    for name, run in children.items():
        assert run.info.status == "FINISHED", name
        tags, params = run.data.tags, run.data.params
        mode = name.split("-")[0]
        assert tags["deitlab.mode"] == mode and tags["deitlab.student"] == "deit_tiny_patch16_224"
        assert tags[TEACHER_FAMILY_TAG] == ("none" if mode == "none" else "convnet")
        assert params["distillation.mode"] == mode and params["optim.epochs"] == "2"
        for key in ("acc_cls", "acc_dist", "acc_fused", "acc_teacher", "agreement", "train_loss", "train_base_loss",
                    "train_kd_loss", "lr", "train_images_per_s"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], (name, key)
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss_step"))
        assert steps == list(range(10, steps[-1] + 1, 10)) and steps[-1] >= 80  # ~45 steps per epoch
        system_metrics |= {k for k in run.data.metrics if k.startswith("system/")}
        files = set(_artifacts(client, run.info.run_id))
        assert {"spec.json", "evaluation/curves.png", "evaluation/confusion_matrix.png",
                "evaluation/confusion_matrix.json"} <= files, (name, files)
        best = client.get_logged_model(tags["deitlab.best_model_uri"].removeprefix("models:/"))  # the run's model
        assert best.source_run_id == run.info.run_id and best.tags["deitlab.mode"] == mode
        assert [a.path for a in client.list_logged_model_artifacts(best.model_id)] == ["model.pt"]
        assert {(i.dataset.name, i.tags[0].value) for i in run.inputs.dataset_inputs} == {
            ("digits/train", "train"), ("digits/val", "eval")}
        (server_sweep["tmp"] / name).mkdir(exist_ok=True)
        local = client.download_artifacts(run.info.run_id, "evaluation/confusion_matrix.json",
                                          str(server_sweep["tmp"] / name))
        matrix = json.loads(Path(local).read_text())["matrix"]
        total = sum(map(sum, matrix))
        assert total == validation_images and len(matrix) == 10  # every validation image once; a row per digit
        last_acc = client.get_metric_history(run.info.run_id, "acc_fused")[-1].value
        assert sum(matrix[i][i] for i in range(10)) / total == pytest.approx(last_acc)
    assert "system/cpu_utilization_percentage" in system_metrics

    keys = _bucket_keys(s3_endpoint, f"{PREFIX}/")
    assert sum("/models/m-" in k and k.endswith("/artifacts/model.pt") for k in keys) == 4  # 3 best models, 1 teacher
    assert sum(k.endswith("/artifacts/evaluation/confusion_matrix.png") for k in keys) >= 4  # 3 trials + teacher
    assert any(k.endswith("/artifacts/summary/report.html") for k in keys)


def test_teacher_version_carries_its_card_and_alias(server_sweep):
    client = server_sweep["client"]
    version = client.get_model_version_by_alias("srv-convnet", "champion")
    assert version.run_id == server_sweep["teacher"].run_id
    tags = version.tags
    assert tags["architecture"] == "test_resnet" and tags["family"] == "convnet" and tags["dataset"] == "digits"
    assert float(tags["params_m"]) > 0.1 and float(tags["gflops"]) > 0
    assert tags["data_fingerprint"] == data_fingerprint(load_data(DataSpec()))
    assert float(tags["deitlab.accuracy"]) == pytest.approx(server_sweep["teacher"].metrics["acc"], abs=1e-6)
    # the students recorded which teacher family taught them
    soft = server_sweep["children"]["soft-convnet-s0"]
    assert soft.data.tags["deitlab.teacher_arch"] == "test_resnet"


def test_report_renders_from_the_server_and_s3(server_sweep, server, s3_endpoint, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", "srv-sweep", "--tracking-uri", server.uri, "--format", "html",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "no distillation" in page and "convnet" in page and "data:image/png;base64," in page
    as_json = CliRunner().invoke(app, ["report", "srv-sweep", "--tracking-uri", server.uri, "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.output)
    assert sorted(t["mode"] for t in report["trials"]) == ["hard", "none", "soft"]
    # The summary the sweep left on its parent run is an object in the bucket, and it is the same report.
    [key] = [k for k in _bucket_keys(s3_endpoint, f"{PREFIX}/") if k.endswith("/summary/report.json")]
    stored = json.loads(s3_client(s3_endpoint).get_object(Bucket=BUCKET, Key=key)["Body"].read())
    assert {t["run_ids"][0] for t in stored["trials"]} == {t["run_ids"][0] for t in report["trials"]}


def test_no_secret_reaches_params_tags_or_artifacts(server_sweep, s3_endpoint):
    client = server_sweep["client"]
    recorded = []
    for experiment in client.search_experiments(view_type=ViewType.ALL):
        for run in client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=1000):
            recorded += [*run.data.params.values(), *run.data.tags.values(), *run.data.params, *run.data.tags]
    for model in client.search_registered_models():
        recorded += [model.description or "", *model.tags.values()]
        for version in client.search_model_versions(f"name = '{model.name}'"):
            recorded += [version.description or "", version.source, *version.tags.values()]
    text = "\n".join(recorded)
    blobs = {k: s3_client(s3_endpoint).get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in _bucket_keys(s3_endpoint)}
    for secret in PLANTED:
        assert secret not in text, secret
        assert [k for k, blob in blobs.items() if secret.encode() in blob] == [], secret
    # What was planted is recorded, redacted: the run still says a ticket and a token were given.
    params = server_sweep["children"]["none-s0"].data.params
    assert params["run.tags.ticket"] == "see ***" and params["run.tags.api_token"] == "***"
    assert params["run.tags.note"] == "key=***"


def test_deitlab_ui_on_a_tracking_server_prints_the_sweeps_address(server_sweep, server):
    """A server already serves its UI: `deitlab ui` starts nothing and prints where the sweep's experiment is."""
    result = CliRunner().invoke(app, ["ui", "srv-sweep", "--tracking-uri", server.uri])
    assert result.exit_code == 0, result.output
    experiment = server_sweep["experiment"].experiment_id
    assert result.stdout.strip() == f"{server.uri}/#/experiments/{experiment}/runs?workflowType=machine_learning"


def test_ui_shows_child_runs_and_their_teacher_family(server_sweep, server):
    from browser import check_mlflow_experiment_page, chromium_available

    if chromium_available():
        pytest.skip(chromium_available())
    shots = check_mlflow_experiment_page(server.uri, server_sweep["experiment"].experiment_id,
                                         sorted(server_sweep["children"]), TEACHER_FAMILY_TAG, ["none", "convnet"],
                                         REPO / "test-artifacts" / "mlflow-ui")
    for path in shots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _epoch(manifest: Path) -> int:
    """The epoch of a checkpoint's manifest; 0 while Ray is still copying it."""
    try:
        return json.loads(manifest.read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def test_training_goes_on_through_a_tracking_server_outage(ray_session, server, tmp_path):
    """The server is stopped as soon as the first epoch is checkpointed and started again only after three more epochs
    were checkpointed: the run finishes, and MLflow ends up with every epoch and every step metric exactly once.

    Every wait is on an event (a checkpoint's manifest in storage), never on time: rank 0 logs an epoch's metrics
    right after its checkpoint reached storage and before the next epoch trains. A checkpoint's manifest may be in
    storage before its epoch is logged, so only when checkpoint `down + 3` exists were epochs `down + 1` and `down + 2`
    certainly logged while the server was down, however fast the machine."""
    from deitlab.orchestration.train import train_experiment

    epochs = 10
    spec = validate(ExperimentSpec, {
        "name": "outage", "student": TINY_STUDENT, "distillation": {"mode": "none"},
        "optim": {"epochs": epochs, "warmup_epochs": 0},
        "run": {"tracking_uri": server.uri, "experiment": "srv-outage", "workdir": str(tmp_path),
                "log_every_steps": 5, "keep_checkpoints": epochs}})
    outcome, errors = [], []

    def train():
        try:
            outcome.append(train_experiment(spec))
        except BaseException as err:  # reported by the assertion below
            errors.append(err)

    def checkpointed() -> int:
        manifests = Path(tmp_path, "ray_results").glob("outage-*/checkpoint_*/manifest.json")
        return max((_epoch(p) for p in manifests), default=0)

    thread = threading.Thread(target=train)
    thread.start()
    client = MlflowClient(server.uri)
    deadline = time.monotonic() + 600  # only a hung run ends here
    while checkpointed() < 1:
        assert thread.is_alive() and time.monotonic() < deadline, errors
        time.sleep(0.05)
    server.stop()
    down = checkpointed()  # epochs after this one are logged, at the earliest, after the server went down
    assert down <= epochs - 3, f"{down} of {epochs} epochs ended before the server could be stopped"
    while checkpointed() < down + 3:
        assert thread.is_alive() and time.monotonic() < deadline, errors
        time.sleep(0.05)
    up_at = time.time()
    server.start()
    thread.join(timeout=max(deadline - time.monotonic(), 60))
    assert not errors and outcome, errors
    run_id = outcome[0].run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "epoch")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))  # each epoch once
    # The epochs logged while the server was down reached it afterwards, with the time they were recorded at.
    during = {m.step for m in client.get_metric_history(run_id, "acc") if m.timestamp <= up_at * 1000}
    assert {down + 1, down + 2} <= during
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train_loss_step"))
    assert steps == list(range(5, steps[-1] + 1, 5)) and steps[-1] >= epochs * 44 - 5
