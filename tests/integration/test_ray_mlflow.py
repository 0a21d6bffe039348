"""Real local Ray + real MLflow (SQLite store, local artifacts): teacher registry, 2-worker DDP train, 1-trial sweep,
and the report read back from MLflow."""
import json

import pytest
from conftest import TINY_STUDENT, write_yaml
from deitlab.cli.app import app
from deitlab.core.distill import ACCURACY_KEYS
from deitlab.spec.base import validate
from deitlab.spec.loading import load_sweep
from deitlab.spec.schema import ExperimentSpec, TeacherTrainingSpec
from deitlab.tracking.store import Tracking
from mlflow import MlflowClient
from typer.testing import CliRunner

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def teacher_uri(ray_session, workdir):
    from deitlab.orchestration.train import train_teacher

    spec = TeacherTrainingSpec(name="it-convnet", arch="test_resnet", optim={"epochs": 2},
                               run={"workdir": str(workdir)})
    outcome = train_teacher(spec)
    assert outcome.model_uri == "models:/it-convnet/1"
    return outcome


def test_teacher_is_registered_with_its_accuracy_and_downloadable(teacher_uri, workdir, tmp_path):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    version = client.get_model_version("it-convnet", "1")
    accuracy = float(version.tags["deitlab.accuracy"])
    assert accuracy == pytest.approx(teacher_uri.metrics["acc"], abs=1e-6) and accuracy > 0.5
    run = client.get_run(teacher_uri.run_id)
    assert run.info.status == "FINISHED" and run.data.params["arch"] == "test_resnet"
    history = client.get_metric_history(teacher_uri.run_id, "acc")
    assert [m.step for m in history] == [1, 2]
    tracking = Tracking(f"sqlite:///{workdir / 'mlflow.db'}", "deitlab")
    files = list(tracking.download("models:/it-convnet/latest", tmp_path).rglob("*.pt"))
    assert [f.name for f in files] == ["model.pt"]


def test_two_worker_train_on_cpu_logs_every_epoch(teacher_uri, workdir):
    from deitlab.orchestration.train import train_experiment

    spec = validate(ExperimentSpec, {
        "name": "ddp", "student": TINY_STUDENT, "teacher": {"uri": teacher_uri.model_uri},
        "distillation": {"mode": "soft", "tau": 2.0}, "optim": {"epochs": 2},
        "run": {"workers": 2, "cpus_per_worker": 1, "workdir": str(workdir)}})
    outcome = train_experiment(spec)
    assert outcome.metrics["epoch"] == 2
    run = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.params["run.workers"] == "2"
    for key in ACCURACY_KEYS:
        assert 0.0 <= run.data.metrics[key] <= 1.0
    # both ranks trained on half the data each: images/s is reported for the whole group
    assert run.data.metrics["train_images_per_s"] > 0


def test_one_trial_sweep_and_report(teacher_uri, workdir, tmp_path):
    from deitlab.orchestration.sweep import run_sweep

    path = write_yaml(tmp_path / "sweep.yaml", f"""
name: it-sweep
experiment:
  student: {json.dumps(TINY_STUDENT)}
  optim: {{epochs: 2}}
  run: {{workdir: "{workdir}"}}
teachers:
  convnet: {{uri: "{teacher_uri.model_uri}"}}
grid:
  distillation.mode: [hard]
  distillation.lambda: [0.5]
  teacher: [convnet]
""")
    outcome = run_sweep(load_sweep(path))
    assert outcome.failed == [] and outcome.trials == ["hard-convnet-l0.5-s0"]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    assert len(children) == 1
    child = children[0]
    assert child.data.params["distillation.mode"] == "hard" and child.data.params["teacher"] == "convnet"
    assert child.data.params["distillation.lambda"] == "0.5"
    assert set(ACCURACY_KEYS) <= set(child.data.metrics)

    result = CliRunner().invoke(app, ["report", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["parent_run_id"] == outcome.parent_run_id
    [row] = report["trials"]
    assert row["mode"] == "hard" and row["teacher"] == "convnet" and row["lambda"] == 0.5
    assert row["acc_fused"]["mean"] == pytest.approx(child.data.metrics["acc_fused"])
    assert report["teachers"][0]["teacher"] == "convnet"
    table = CliRunner().invoke(app, ["report", "it-sweep", "--workdir", str(workdir)])
    assert table.exit_code == 0 and "convnet" in table.stdout


def test_bad_teacher_uri_fails_before_training(ray_session, workdir, tmp_path):
    path = write_yaml(tmp_path / "e.yaml", f"""
student: {json.dumps(TINY_STUDENT)}
teacher: {{uri: "models:/no-such-teacher/1"}}
run: {{workdir: "{workdir}"}}
""")
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert "models:/no-such-teacher/1" in result.output and "Traceback" not in result.output
