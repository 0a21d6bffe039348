"""A sweep goes on when one trial diverges; a request that can never be placed fails before anything starts."""
import json

import pytest
from conftest import TINY_STUDENT, write_yaml
from deitlab.cli.app import app
from deitlab.errors import SpecError
from deitlab.orchestration.train import train_experiment
from deitlab.spec.base import validate
from deitlab.spec.loading import load_sweep
from deitlab.spec.schema import ExperimentSpec
from mlflow import MlflowClient
from typer.testing import CliRunner

pytestmark = pytest.mark.integration


def test_a_diverging_trial_fails_alone_with_its_reason(ray_session, workdir, tmp_path):
    from deitlab.orchestration.sweep import run_sweep

    path = write_yaml(tmp_path / "sweep.yaml", f"""
name: it-nan
experiment:
  student: {json.dumps(TINY_STUDENT)}
  distillation: {{mode: none}}
  optim: {{epochs: 2}}
  run: {{workdir: "{workdir}"}}
grid:
  optim.lr: [0.002, 1.0e+30]
""")
    outcome = run_sweep(load_sweep(path))
    assert outcome.trials == ["lr0.002-s0", "lr1e+30-s0"] and outcome.failed == ["lr1e+30-s0"]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    children = {r.info.run_name: r for r in client.search_runs(
        [client.get_run(outcome.parent_run_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")}
    diverged, healthy = children["lr1e+30-s0"], children["lr0.002-s0"]
    assert diverged.info.status == "FAILED"
    assert "not finite at epoch 1" in diverged.data.tags["deitlab.diverged"]
    assert "deitlab.worker_failures" not in diverged.data.tags  # stopped, not retried from its checkpoint
    assert healthy.info.status == "FINISHED" and healthy.data.metrics["epoch"] == 2


def test_a_request_that_can_never_be_placed_fails_before_starting(ray_session, workdir, tmp_path):
    cores = ray_session.cluster_resources()["CPU"]
    spec = validate(ExperimentSpec, {"student": TINY_STUDENT, "distillation": {"mode": "none"},
                                     "run": {"workers": int(cores) + 1, "workdir": str(workdir)}})
    with pytest.raises(SpecError, match=rf"{int(cores) + 1} worker\(s\) × 1 CPU can never start on the Ray cluster"):
        train_experiment(spec)
    with pytest.raises(SpecError, match="no node of the Ray cluster .* fits one worker"):
        train_experiment(spec.with_overrides({"run.workers": 1, "run.gpus_per_worker": 1}))
    with pytest.raises(SpecError, match="strict_spread needs 2 nodes that fit a worker; the Ray cluster has 1"):
        train_experiment(spec.with_overrides({"run.workers": 2, "run.placement": "strict_spread"}))
    path = write_yaml(tmp_path / "e.yaml", json.dumps(spec.model_dump(by_alias=True, exclude_unset=True)))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2 and "can never start" in result.output and "Traceback" not in result.output
