"""Sweeps that survive their driver: killed mid-way and resumed, extended with seeds, ASHA early stopping, and
submission as a Ray Job to a `ray start --head` cluster. MLflow is the record checked throughout."""
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
from conftest import TINY_STUDENT, free_port, ray_processes, write_yaml
from deitlab.cli.app import app
from mlflow import MlflowClient
from typer.testing import CliRunner

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def _sweep(tmp_path: Path, name: str, workdir: Path, epochs: int = 2, **fields) -> Path:
    raw = {"name": name, "seeds": [0, 1, 2], "max_concurrent": 1,
           "experiment": {"name": f"{name}-student", "student": TINY_STUDENT, "distillation": {"mode": "none"},
                          "data": {"augment": {"rotate": 0, "translate": 0, "scale": [1, 1]}},
                          "optim": {"epochs": epochs, "warmup_epochs": 0},
                          "run": {"workdir": str(workdir), "experiment": name}},
           **fields}
    return write_yaml(tmp_path / f"{name}.yaml", json.dumps(raw))


def _children(workdir: Path, experiment: str) -> list:
    if not (workdir / "mlflow.db").exists():  # not created yet by the driver: opening it would create it here
        return []
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], "tags.`deitlab.kind` = 'trial'", max_results=1000)


def _parent(workdir: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [parent] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                  "tags.`deitlab.kind` = 'sweep'")
    return parent


def test_killed_sweep_resumes_without_rerunning_finished_trials_then_extends(ray_session, tmp_path):
    workdir = tmp_path / "work"
    path = _sweep(tmp_path, "sw-kill", workdir)
    # The driver joins the session's Ray as its own job: killing it makes Ray reap its trials and workers.
    driver = subprocess.Popen([str(BIN / "deitlab"), "sweep", "run", str(path), "--ray-address",
                               ray_session.get_runtime_context().gcs_address],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not any(r.info.status == "FINISHED" for r in _children(workdir, "sw-kill")):
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no trial finished"
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    while ray_processes("ray::RayTrainWorker"):
        assert time.monotonic() < deadline, "the killed sweep's Train workers are still running"
        time.sleep(0.2)
    before = {r.info.run_name: r for r in _children(workdir, "sw-kill")}
    finished_before = {n for n, r in before.items() if r.info.status == "FINISHED"}
    assert finished_before and len(finished_before) < 3
    assert _parent(workdir, "sw-kill").info.status == "RUNNING"  # nobody closed it: the driver died

    status = CliRunner().invoke(app, ["sweep", "status", "sw-kill", "--workdir", str(workdir)])
    assert status.exit_code == 0, status.output
    assert "driver" in status.output and "gone" in status.output and "pending" in status.output

    resumed = CliRunner().invoke(app, ["sweep", "resume", "sw-kill", "--workdir", str(workdir)])
    assert resumed.exit_code == 0, resumed.output
    after = _children(workdir, "sw-kill")
    names = sorted(r.info.run_name for r in after)
    assert names == ["s0", "s1", "s2"]  # one MLflow run per trial: nothing ran twice
    assert all(r.info.status == "FINISHED" for r in after)
    for name in finished_before:  # the trials that had finished were not touched
        run = next(r for r in after if r.info.run_name == name)
        assert run.info.run_id == before[name].info.run_id and run.info.end_time == before[name].info.end_time
    for name, run in before.items():  # an interrupted trial continued in its own MLflow run
        assert any(r.info.run_id == run.info.run_id for r in after)
    parent = _parent(workdir, "sw-kill")
    assert parent.info.status == "FINISHED"
    again = CliRunner().invoke(app, ["sweep", "resume", "sw-kill", "--workdir", str(workdir)])
    assert again.exit_code == 2 and "nothing to resume" in again.output

    # Extend the finished sweep with two seeds: only they run, under the same parent run.
    extended = CliRunner().invoke(app, ["sweep", "extend", "sw-kill", "--workdir", str(workdir),
                                        "--set", "seeds=[0,1,2,3,4]"])
    assert extended.exit_code == 0, extended.output
    runs = _children(workdir, "sw-kill")
    assert sorted(r.info.run_name for r in runs) == [f"s{s}" for s in range(5)]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert all(r.info.status == "FINISHED" and r.data.metrics["acc"] > 0.15 for r in runs)  # chance: 0.1
    parent = _parent(workdir, "sw-kill")
    assert parent.info.status == "FINISHED" and parent.data.tags["deitlab.extensions"] == "1"
    nothing = CliRunner().invoke(app, ["sweep", "extend", "sw-kill", "--workdir", str(workdir),
                                       "--set", "seeds=[0,1]"])
    assert nothing.exit_code == 2 and "add no trial" in nothing.output
    changed = CliRunner().invoke(app, ["sweep", "extend", "sw-kill", "--workdir", str(workdir),
                                       "--set", "experiment.optim.epochs=9"])
    assert changed.exit_code == 2 and "base experiment" in changed.output
    report = CliRunner().invoke(app, ["report", "sw-kill", "--workdir", str(workdir), "--format", "json"])
    [row] = json.loads(report.stdout)["trials"]
    assert sorted(row["seeds"]) == [0, 1, 2, 3, 4] and row["acc"]["n"] == 5


def test_asha_stops_a_hopeless_trial_and_releases_its_resources(ray_session, tmp_path):
    workdir = tmp_path / "work"
    # One trial at a time: the good learning rate reaches each rung first, the hopeless one is then cut at epoch 1.
    path = _sweep(tmp_path, "sw-asha", workdir, epochs=4, seeds=[0], grid={"optim.lr": [0.003, 1e-7]},
                  early_stopping={"grace_period": 1, "reduction_factor": 2})
    result = CliRunner().invoke(app, ["sweep", "run", str(path)])
    assert result.exit_code == 0, result.output
    runs = {r.info.run_name: r for r in _children(workdir, "sw-asha")}
    good, hopeless = runs["lr0.003-s0"], runs["lr1e-07-s0"]
    assert good.info.status == "FINISHED" and good.data.metrics["epoch"] == 4
    assert hopeless.info.status == "KILLED" and hopeless.data.metrics["epoch"] < 4
    assert hopeless.data.tags["deitlab.stopped_early"].startswith("ASHA at epoch")
    assert "1 stopped" in result.output and "best trial: lr0.003-s0" in result.output
    deadline = time.monotonic() + 300  # the stopped trial's Train run and workers are gone, its CPUs free again
    while ray_session.available_resources().get("CPU", 0) < ray_session.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray_session.available_resources()
        time.sleep(0.5)


def test_init_from_a_run_fine_tunes_at_a_higher_resolution(ray_session, tmp_path):
    """DeiT Table 7's mechanics: a student trained at 16 px starts a 32 px run (position embedding resampled)."""
    workdir = tmp_path / "work"
    base = {"student": TINY_STUDENT, "distillation": {"mode": "none"}, "optim": {"epochs": 4, "warmup_epochs": 0},
            "data": {"augment": {"rotate": 0, "translate": 0, "scale": [1, 1]}}, "run": {"workdir": str(workdir)}}
    source = write_yaml(tmp_path / "source.yaml", json.dumps({**base, "name": "source"}))
    trained = CliRunner().invoke(app, ["train", str(source)])
    assert trained.exit_code == 0, trained.output
    run_id = trained.output.split("MLflow run ")[1].split(")")[0]
    at32 = {**base, "data": {**base["data"], "img_size": 32}, "optim": {"epochs": 1, "warmup_epochs": 0}}
    for name, extra in (("scratch", {}), ("finetuned", {"init_from": f"runs:/{run_id}"})):
        path = write_yaml(tmp_path / f"{name}.yaml", json.dumps({**at32, "name": name, **extra}))
        result = CliRunner().invoke(app, ["train", str(path)])
        assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("deitlab").experiment_id
    acc = {r.info.run_name: r.data.metrics["acc"] for r in client.search_runs([experiment])}
    assert acc["source"] > 0.3  # chance: 0.1
    assert acc["finetuned"] > acc["scratch"] + 0.2, acc  # one epoch from trained weights beats one from scratch
    bad = write_yaml(tmp_path / "bad.yaml", json.dumps({**at32, "name": "bad", "init_from": "runs:/0123abcd"}))
    result = CliRunner().invoke(app, ["train", str(bad)])
    assert result.exit_code == 2 and "init_from 'runs:/0123abcd': no MLflow run" in result.output


@pytest.fixture()
def head_node(tmp_path):
    """A `ray start --head` cluster with its dashboard (the Jobs API) and token authentication, as a real cluster
    should run; the venv's bin on PATH, as on a real node. Yields (dashboard URL, the client's environment)."""
    ports = [free_port() for _ in range(3)]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--port", str(ports[0]), "--dashboard-host",
                             "127.0.0.1", "--dashboard-port", str(ports[1]), "--num-cpus", "3", "--block",
                             # the session's own Ray holds the default agent port (52365): a second agent needs another
                             "--dashboard-agent-listen-port", str(ports[2]),
                             "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "head.log", "wb"))
    try:
        deadline = time.monotonic() + 300
        dashboard = f"http://127.0.0.1:{ports[1]}"
        # Ready when a job is accepted: the dashboard answers and the head's job agent is up (a submission waits
        # only 10 s for an agent that is still starting)
        probe = f"from ray.job_submission import JobSubmissionClient as C; C('{dashboard}').submit_job(entrypoint='true')"
        while subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(1)
        yield dashboard, env
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{ports[0]}"):
            current.unlink()


def test_submit_runs_the_sweep_as_a_ray_job_on_a_head_node(head_node, tmp_path):
    head_node, env = head_node
    workdir = tmp_path / "work"
    path = _sweep(tmp_path, "sw-submit", workdir, epochs=1, seeds=[0, 1], max_concurrent=2)
    submitted = subprocess.run([str(BIN / "deitlab"), "sweep", "submit", str(path), "--address", head_node],
                               capture_output=True, text=True, timeout=600, env=env)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "submitted sweep 'sw-submit' as Ray job deitlab-sw-submit-" in submitted.stdout
    job_id = submitted.stdout.split("Ray job ")[1].split()[0]
    assert "sweep sw-submit" in submitted.stdout  # the job's log, followed: the driver's summary line
    runs = _children(workdir, "sw-submit")
    assert sorted(r.info.run_name for r in runs) == ["s0", "s1"]
    assert all(r.info.status == "FINISHED" for r in runs)
    parent = _parent(workdir, "sw-submit")
    assert parent.info.status == "FINISHED" and parent.data.tags["deitlab.ray_job_id"] == job_id
    status = subprocess.run([str(BIN / "deitlab"), "sweep", "status", "sw-submit", "--workdir", str(workdir),
                             "--address", head_node], capture_output=True, text=True, env=env)
    assert status.returncode == 0 and f"Ray job {job_id}: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    stop = subprocess.run([str(BIN / "deitlab"), "sweep", "stop", "sw-submit", "--address", head_node],
                          capture_output=True, text=True, env=env)
    assert stop.returncode == 2 and "no running Ray job of sweep 'sw-submit'" in stop.stderr
    bad = subprocess.run([str(BIN / "deitlab"), "sweep", "submit", str(path), "--address", "http://127.0.0.1:9"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "cannot reach a Ray cluster" in bad.stderr
