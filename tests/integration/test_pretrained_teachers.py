"""Teachers people have: pretrained timm weights from a Hugging Face hub cache the test builds (random weights, so
nothing here says which teacher is better — only that the right weights are loaded, recorded and compared).

Two teachers are imported with `deitlab teacher import` (the real command, offline), a sweep over both runs through
Ray Tune and MLflow on synthetic 1000-class data, and each run names its teacher by the imported file's SHA-256. A
teacher fine-tuned from pretrained weights and one trained from scratch, same epochs on digits."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_STUDENT, write_yaml
from deitlab.cli.app import app
from mlflow import MlflowClient
from typer.testing import CliRunner

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
TEACHERS = {"convnet": "test_resnet.r160_in1k", "vit": "test_vit.r160_in1k"}
# 1000 classes, 3 images each: 2 train, 1 validation per class
DATA = {"dataset": "synthetic", "synthetic_classes": 1000, "synthetic_size": 3000, "val_fraction": 0.34,
        "img_size": 32, "batch_size": 64, "augment": {"rotate": 0, "translate": 0, "scale": [1, 1]}}


def _deitlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "deitlab"), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def hub_sweep(ray_session, hub_cache, tmp_path_factory):
    """Two imported teachers (`deitlab teacher import`, offline) and a sweep over both: no distillation, soft and
    hard, packed by teacher (two packs: the baseline measures agreement with one of them, and trains in its pack)."""
    tmp_path = tmp_path_factory.mktemp("hub-sweep")
    workdir = tmp_path / "work"
    shas = {label: hub_cache.add(name, seed=i) for i, (label, name) in enumerate(TEACHERS.items())}
    data_spec = write_yaml(tmp_path / "data.yaml", json.dumps(DATA))
    imported = {}
    for label, name in TEACHERS.items():
        imported[label] = _deitlab("teacher", "import", name, "--name", f"hub-{label}", "--alias", "champion",
                                   "--data", str(data_spec), "--workdir", str(workdir), cwd=tmp_path)
    sweep = write_yaml(tmp_path / "sweep.yaml", json.dumps({
        "name": "hub-teachers", "seeds": [0], "max_concurrent": 2, "pack": 3,
        "teachers": {label: {"uri": f"models:/hub-{label}@champion"} for label in TEACHERS},
        "grid": {"distillation.mode": ["none", "soft", "hard"], "teacher": list(TEACHERS)},
        "experiment": {"student": TINY_STUDENT, "data": DATA, "optim": {"epochs": 1, "warmup_epochs": 0},
                       "run": {"workdir": str(workdir), "experiment": "hub-teachers", "log_every_steps": 0}}}))
    result = CliRunner().invoke(app, ["sweep", "run", str(sweep)]) if all(
        r.returncode == 0 for r in imported.values()) else None
    return {"workdir": workdir, "shas": shas, "imported": imported, "sweep": result, "tmp": tmp_path,
            "client": MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")}


def _trials(client: MlflowClient) -> dict:
    experiment = client.get_experiment_by_name("hub-teachers")
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id],
                                                           "tags.`deitlab.kind` = 'trial'")}


def test_imported_pretrained_teachers_are_compared_in_a_sweep(hub_sweep):
    shas, client = hub_sweep["shas"], hub_sweep["client"]
    for label, name in TEACHERS.items():
        result = hub_sweep["imported"][label]
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"registered models:/hub-{label}/1 (alias champion): {name}, sha256 {shas[label][:16]}" in result.stdout
    for label, name in TEACHERS.items():
        version = client.get_model_version_by_alias(f"hub-{label}", "champion")
        card = version.tags
        assert card["source"] == name and card["weights_sha256"] == shas[label]
        assert card["num_classes"] == "1000" and card["img_size"] == "160" and json.loads(card["mean"]) == [0.5] * 3
        assert float(card["params_m"]) > 0 and float(card["gflops"]) > 0
        assert 0 <= float(card["deitlab.accuracy"]) <= 1  # measured on the data spec's validation split
        # the version is the import's logged model: its accuracy is a model metric, linked to the data it was
        # measured on, and the model knows the version
        model = client.get_logged_model(version.source.removeprefix("models:/"))
        assert version.source.startswith("models:/m-") and model.source_run_id == version.run_id
        [acc] = [m for m in model.metrics if m.key == "acc"]
        assert acc.value == pytest.approx(float(card["deitlab.accuracy"]), abs=1e-6)
        assert acc.dataset_name == "synthetic/val"
        assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": f"hub-{label}", "version": "1"}]
    result = hub_sweep["sweep"]
    assert result is not None and result.exit_code == 0, result.output if result else "the imports failed"
    trials = _trials(client)
    assert sorted(trials) == ["hard-convnet-s0", "hard-vit-s0", "none-s0", "soft-convnet-s0", "soft-vit-s0"]
    for label in TEACHERS:
        for mode in ("soft", "hard"):
            run = trials[f"{mode}-{label}-s0"]
            assert run.info.status == "FINISHED"
            tags, params = run.data.tags, run.data.params
            assert tags["deitlab.teacher"] == label and tags["deitlab.pack"]  # packed, by teacher
            assert tags["deitlab.teacher_sha256"] == shas[label]  # the weights that were imported
            assert tags["deitlab.teacher_arch"] == TEACHERS[label]
            assert 0 <= run.data.metrics["acc_teacher"] <= 1
            # the teacher's size and accuracy as numbers beside the student's (the chart view's axes)
            card = client.get_model_version(f"hub-{label}", "1").tags
            # (the forward the run pays: at the teacher's own input size, 160, to which the batches are resized)
            assert float(params["teacher.gflops"]) == float(tags["deitlab.teacher_gflops"]) > float(card["gflops"])
            assert float(params["teacher.params_m"]) == pytest.approx(float(card["params_m"]), rel=1e-3)
            assert float(params["teacher.accuracy"]) == pytest.approx(float(card["deitlab.accuracy"]), abs=1e-5)
            assert ("distillation.tau" in params) == (mode == "soft")
    packs = {trials[f"{m}-{label}-s0"].data.tags["deitlab.pack"] for m in ("soft", "hard") for label in TEACHERS}
    assert len(packs) == 2
    baseline = trials["none-s0"].data
    assert baseline.tags["deitlab.teacher"] == "none" and baseline.tags["deitlab.reference_teacher"] in TEACHERS
    assert not {"distillation.tau", "distillation.lambda", "teacher"} & set(baseline.params)
    experiment = client.get_experiment_by_name("hub-teachers").experiment_id
    soft = client.search_runs([experiment], "params.`distillation.tau` = '3.0'")
    assert sorted(r.info.run_name for r in soft) == ["soft-convnet-s0", "soft-vit-s0"]
    # each trial's data as MLflow datasets (the same digests for all: one data spec) and its best model
    digests = set()
    for name, run in trials.items():
        inputs = {(i.dataset.name, i.tags[0].value): i.dataset.digest for i in run.inputs.dataset_inputs}
        assert set(inputs) == {("synthetic/train", "train"), ("synthetic/val", "eval")}, name
        digests.add(tuple(sorted(inputs.values())))
        best = client.get_logged_model(run.data.tags["deitlab.best_model_uri"].removeprefix("models:/"))
        assert best.source_run_id == run.info.run_id and best.name == "best_model"
        assert {m.dataset_name for m in best.metrics} == {"synthetic/val"}
    assert len(digests) == 1
    report = CliRunner().invoke(app, ["report", "hub-teachers", "--workdir", str(hub_sweep["workdir"]),
                                      "--format", "json"])
    assert report.exit_code == 0, report.output
    shown = json.loads(report.output)
    assert {t["teacher"] for t in shown["trials"] if t["mode"] != "none"} == set(TEACHERS)
    assert [t["teacher"] for t in shown["trials"] if t["mode"] == "none"] == [baseline.tags["deitlab.reference_teacher"]]


def test_the_mlflow_ui_compares_the_teachers(hub_sweep):
    """`deitlab ui` serves the store; in the browser the sweep's runs grouped by teacher are none 1, convnet 2, vit 2;
    the chart view draws one curve per group; a trial's page shows its datasets and model; the registry's teacher
    versions show their cards and link their logged models."""
    from browser import check_mlflow_teacher_comparison, chromium_available
    from conftest import free_port

    if chromium_available():
        pytest.skip(chromium_available())
    assert hub_sweep["sweep"] is not None and hub_sweep["sweep"].exit_code == 0, "the sweep did not run"
    port = free_port()
    ui = subprocess.Popen([str(BIN / "deitlab"), "ui", "hub-teachers", "--workdir", str(hub_sweep["workdir"]),
                           "--port", str(port)], cwd=hub_sweep["tmp"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"})
    try:
        url = ui.stdout.readline().strip()  # printed once the server answers (or the command fails and exits)
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/"), (url, ui.poll(), ui.stderr.read()
                                                                            if ui.poll() is not None else "")
        experiment = hub_sweep["client"].get_experiment_by_name("hub-teachers").experiment_id
        assert url == f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs?workflowType=machine_learning"
        shots = check_mlflow_teacher_comparison(
            f"http://127.0.0.1:{port}", experiment, {"none": 1, "convnet": 2, "vit": 2}, "soft-vit-s0",
            ["synthetic/train", "synthetic/val"], [(f"hub-{label}", "1") for label in TEACHERS],
            ["source", "weights_sha256", "params_m", "gflops", "deitlab.accuracy"],
            REPO / "test-artifacts" / "mlflow-ui-teachers")
        assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in shots.values())
    finally:
        ui.send_signal(signal.SIGINT)  # Ctrl-C: the command stops its server and exits 0
        rc = ui.wait(timeout=120)
    assert rc == 0, ui.stderr.read()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # nothing left listening


def test_a_teacher_fine_tuned_from_pretrained_weights_and_one_from_scratch(ray_session, hub_cache, tmp_path):
    """Both train on digits for the same epochs; the fine-tuned one starts from the hub's weights (a new 10-class head,
    the stem adapted to one channel) — checked before training. With random 'pretrained' weights the two accuracies
    only show that both learn; they are printed for the record."""
    from deitlab.core.engine import teacher_engine
    from deitlab.spec.schema import TeacherTrainingSpec

    name = "test_resnet.r160_in1k"
    hub_cache.add(name, seed=5)
    workdir = tmp_path / "work"
    specs = {}
    for label, pretrained in (("finetuned", True), ("scratch", False)):
        raw = {"name": f"digits-{label}", "arch": name, "pretrained": pretrained, "optim": {"epochs": 4},
               "data": {"img_size": 32}, "run": {"workdir": str(workdir), "experiment": "finetune"}}
        specs[label] = write_yaml(tmp_path / f"{label}.yaml", json.dumps(raw))
        if pretrained:
            import timm

            torch.manual_seed(5)
            hub = timm.create_model(name)  # what the cache holds
            engine = teacher_engine(TeacherTrainingSpec(**raw), device=torch.device("cpu"))
            model = engine.model
            assert model.fc.out_features == 10 and model.conv1[0].weight.shape[1] == 1
            assert torch.equal(model.layer1[0].conv1.weight, hub.layer1[0].conv1.weight)
            assert torch.allclose(model.conv1[0].weight[:, 0], hub.conv1[0].weight.sum(dim=1))
    result = CliRunner().invoke(app, ["teacher", "train", str(specs["finetuned"]), str(specs["scratch"])])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    accuracy = {label: float(client.get_model_version(f"digits-{label}", "1").tags["deitlab.accuracy"])
                for label in specs}
    print(f"digits, 4 epochs, {name}: fine-tuned from (random) pretrained weights {accuracy['finetuned']:.4f},"
          f" from scratch {accuracy['scratch']:.4f}")
    assert all(acc > 0.3 for acc in accuracy.values()), accuracy  # both learn: chance is 0.1
