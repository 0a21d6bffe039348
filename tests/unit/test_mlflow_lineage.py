"""What the MLflow UI groups, searches and links by, on a real SQLite store: baselines apart from teachers, params only
where they apply, datasets by split fingerprint, logged models with metrics, registry versions that point at them."""
import json

import pytest
import torch
from deitlab.core.models import build_classifier, save_model
from deitlab.data.loaders import load_data, split_fingerprints
from deitlab.orchestration.lineage import dataset_records, log_model_file, record_datasets
from deitlab.orchestration.train import run_tags, teacher_params
from deitlab.spec.base import validate
from deitlab.spec.schema import DataSpec, ExperimentSpec
from deitlab.tracking.store import Tracking
from mlflow import MlflowClient

STUDENT = {"patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 1}
TEACHER_FACTS = {"convnet": {"family": "convnet", "arch": "test_resnet", "params_m": 0.0123, "gflops": 0.0456,
                             "sha256": "ab" * 32, "accuracy": 0.9}}


@pytest.fixture
def tracking(tmp_path):
    tracking = Tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", "lineage", (tmp_path / "art").as_uri())
    tracking.experiment_id()
    return tracking


def _spec(mode: str, **distillation) -> ExperimentSpec:
    return validate(ExperimentSpec, {"student": STUDENT, "teacher": {"name": "convnet", "checkpoint": "/t.pt"},
                                     "distillation": {"mode": mode, **distillation}})


def test_groups_and_searches_count_only_what_applies(tracking):
    """Grouped by deitlab.teacher the baseline is its own group; τ searches find soft runs only; teacher size and
    accuracy are numbers on the distilled runs."""
    specs = {"none-s0": _spec("none"), "hard-convnet-s0": _spec("hard"), "soft-convnet-t3-s0": _spec("soft", tau=3.0)}
    ids = {}
    for name, spec in specs.items():
        ids[name] = tracking.start_run(name, params={**spec.flat_params(), **teacher_params(spec, TEACHER_FACTS)},
                                       tags=run_tags(spec, TEACHER_FACTS))
    client = tracking.client
    experiment = tracking.experiment_id(create=False)

    def names(query: str) -> list[str]:
        return sorted(r.info.run_name for r in client.search_runs([experiment], query))

    assert names("tags.`deitlab.teacher` = 'none'") == ["none-s0"]
    assert names("tags.`deitlab.teacher` = 'convnet'") == ["hard-convnet-s0", "soft-convnet-t3-s0"]
    assert names("tags.`deitlab.reference_teacher` = 'convnet'") == ["none-s0"]
    assert names("params.`distillation.tau` = '3.0'") == ["soft-convnet-t3-s0"]  # not hard's unused default
    assert names("params.`distillation.lambda` = '0.5'") == ["hard-convnet-s0"]
    assert names("params.teacher = 'convnet'") == ["hard-convnet-s0", "soft-convnet-t3-s0"]
    hard = tracking.run(ids["hard-convnet-s0"]).params
    assert (hard["teacher.gflops"], hard["teacher.params_m"], hard["teacher.accuracy"]) == ("0.0456", "0.0123", "0.9")
    assert not [k for k in tracking.run(ids["none-s0"]).params if k.startswith("teacher")]


def test_datasets_are_the_splits_by_fingerprint_once_per_run(tracking, tmp_path):
    data = DataSpec()
    bundle = load_data(data)
    run_a, run_b = tracking.start_run("a"), tracking.start_run("b")
    record_datasets(tracking, [run_a, run_b], data, bundle)
    record_datasets(tracking, [run_a], data, bundle)  # a resumed run logs them again: nothing is added
    train_digest, val_digest = split_fingerprints(bundle)
    assert train_digest != val_digest and len(train_digest) == 16
    for run_id in (run_a, run_b):
        inputs = tracking.client.get_run(run_id).inputs.dataset_inputs
        seen = sorted((i.dataset.name, i.dataset.digest, [t.value for t in i.tags][0]) for i in inputs)
        assert seen == [("digits/train", train_digest, "train"), ("digits/val", val_digest, "eval")]
        profile = json.loads(next(i for i in inputs if i.dataset.name == "digits/val").dataset.profile)
        assert profile == {"img_size": bundle.img_size, "kind": "digits", "num_classes": 10, "num_rows": bundle.sizes[1]}
    folder = DataSpec(dataset="synthetic", path=None)
    assert [r.source for r in dataset_records(folder, load_data(folder))] == [None, None]


def test_models_are_logged_models_and_registry_versions_point_at_them(tracking, tmp_path):
    data = DataSpec()
    bundle = load_data(data)
    teacher = build_classifier("test_resnet", {}, num_classes=10, in_chans=1)
    path = save_model(tmp_path / "model.pt", teacher, arch="test_resnet", model_kwargs={}, num_classes=10,
                      in_chans=1, metadata={"accuracy": 0.8})
    run_id = tracking.start_run("teacher-convnet")
    tracking.log_metrics(run_id, {"acc": 0.8125, "acc_cls": 0.8125, "epoch": 3}, step=3)  # as the worker logged it
    model = log_model_file(tracking, run_id, path, "teacher", metrics={"acc": 0.8125, "acc_cls": 0.8125}, step=3,
                           params={"architecture": "test_resnet"}, tags={"deitlab.kind": "teacher"}, data=data,
                           bundle=bundle)
    client: MlflowClient = tracking.client
    logged = client.get_logged_model(model.model_id)
    assert str(logged.status).endswith("READY")
    assert logged.source_run_id == run_id and logged.params == {"architecture": "test_resnet"}
    assert sorted((m.key, m.value, m.step, m.dataset_name, m.dataset_digest) for m in logged.metrics) == [
        ("acc", 0.8125, 3, "digits/val", split_fingerprints(bundle)[1]),
        ("acc_cls", 0.8125, 3, "digits/val", split_fingerprints(bundle)[1])]
    # the run's history holds each epoch once: the model's metric is the run's own point
    assert [(p.step, p.value) for p in tracking.metric_history(run_id, "acc")] == [(3, 0.8125)]
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [model.model_id]

    uri = tracking.register_teacher(run_id, model, "lineage-convnet", 0.8125, tags={"family": "convnet"},
                                    alias="champion")
    assert uri == "models:/lineage-convnet/1"
    version = client.get_model_version("lineage-convnet", "1")
    assert version.source == model.uri and version.run_id == run_id and version.tags["family"] == "convnet"
    assert json.loads(client.get_logged_model(model.model_id).tags["mlflow.modelVersions"]) == [
        {"name": "lineage-convnet", "version": "1"}]
    for ref in (uri, "models:/lineage-convnet@champion", "models:/lineage-convnet/latest", model.uri):
        assert tracking.model_source(ref) == model.artifact_location, ref
        got = tracking.download(ref, tmp_path / "dl" / ref.replace("/", "_").replace(":", "_").replace("@", "_"))
        state = torch.load(got / "model.pt", weights_only=True)  # the same file, loaded as a state dict
        assert state["arch"] == "test_resnet"
    # a version registered before (its source the run's artifact) still resolves to that artifact
    tracking.log_artifact(run_id, path, "teacher")
    old = client.create_model_version("lineage-convnet", f"{client.get_run(run_id).info.artifact_uri}/teacher",
                                      run_id=run_id)
    assert tracking.model_source(f"models:/lineage-convnet/{old.version}").endswith("/artifacts/teacher")
