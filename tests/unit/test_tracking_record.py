"""What MLflow records: secrets never, every metric value once (even across an unreachable store), and the numbers
that describe a teacher (family, size, data fingerprint) and a run (confusion matrix)."""
import json

import pytest
import torch
from conftest import free_port
from deitlab.core.distill import confusion_counts
from deitlab.tracking.redact import REDACTED, scrub, scrub_item, scrub_tree
from deitlab.tracking.store import Tracking

AWS_KEY_ID = "AKIAZZZZEXAMPLE12345"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYplantedKEY"


def test_secret_values_shapes_and_names_are_redacted(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_API_TOKEN", "tok-123456789")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # a secret-looking name whose value is an ordinary word
    text = (f"key {AWS_KEY_ID} uri http://alice:hunter22@mlflow:5000/x s3://b/p?X-Amz-Signature=abc123&v=1"
            " token tok-123456789 mode token")
    assert scrub(text) == ("key *** uri http://***@mlflow:5000/x s3://b/p?X-Amz-Signature=***&v=1"
                           " token *** mode token")
    assert scrub_item("run.tags.db_password", "plain") == REDACTED
    assert scrub_item("distillation.token", True) == "True"  # our own field, not a secret
    assert scrub_item("run.workdir", "/data/w") == "/data/w"
    tree = scrub_tree({"run": {"tracking_uri": "https://u:p@h/", "tags": {"secret_key": "x"}}, "n": [AWS_KEY_ID, 3]})
    assert tree == {"run": {"tracking_uri": "https://***@h/", "tags": {"secret_key": REDACTED}}, "n": [REDACTED, 3]}
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----"
    assert scrub(f"a {pem} b") == f"a {REDACTED} b"


def test_params_tags_and_json_artifacts_never_hold_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    tracking = Tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", "secrets", (tmp_path / "art").as_uri())
    tracking.experiment_id()
    run_id = tracking.start_run("r", params={"run.tracking_uri": "http://bob:pw123456@host", "note": AWS_SECRET},
                                tags={"deitlab.note": f"id {AWS_KEY_ID}", "api_key": "abc"})
    tracking.log_json(run_id, "spec.json", {"uri": "http://bob:pw123456@host", "nested": {"x": AWS_SECRET}})
    run = tracking.client.get_run(run_id)
    assert run.data.params == {"run.tracking_uri": "http://***@host", "note": REDACTED}
    assert run.data.tags["deitlab.note"] == f"id {REDACTED}" and run.data.tags["api_key"] == REDACTED
    assert tracking.read_json(run_id, "spec.json") == {"uri": "http://***@host", "nested": {"x": REDACTED}}


def test_metric_logger_keeps_values_on_disk_while_mlflow_is_down_and_delivers_them_later(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    store = Tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", "buffer", (tmp_path / "art").as_uri())
    store.experiment_id()
    run_id = store.start_run("r")
    spill = tmp_path / "spill"
    # Nothing listens on this port: every send fails, as with a tracking server that is down.
    down = Tracking(f"http://127.0.0.1:{free_port()}", "buffer")
    logger = down.metric_logger(run_id, spill_dir=spill, max_pending=40, max_backoff_s=0.2)
    for step in range(100):
        logger.log({"loss": 1.0 / (step + 1), "lr": 0.1, "skipped_nan": float("nan")}, step=step)
    assert logger.flush(timeout=1.0) is False
    assert logger.close(timeout=1.0) == 200  # 100 steps × 2 finite values, none dropped
    lines = (spill / f"{run_id}.jsonl").read_text().splitlines()
    assert len(lines) == 200 and json.loads(lines[0])[:2] == ["loss", 1.0]

    # A new logger for the run (a restarted rank 0) finds the spill file and delivers it to a store that answers.
    again = store.metric_logger(run_id, spill_dir=spill)
    assert again.undelivered == 200
    again.log({"loss": 0.001}, step=100)
    assert again.flush(timeout=30) is True and again.close(timeout=5) == 0
    history = store.client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(101))
    assert {m.step: m.value for m in history}[3] == pytest.approx(0.25)
    assert len(store.client.get_metric_history(run_id, "lr")) == 100
    assert not (spill / f"{run_id}.jsonl").exists()


def test_confusion_counts_rows_are_true_classes():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 2, 0, 2])
    assert confusion_counts(labels, predicted, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_teacher_card_numbers():
    import timm
    from deitlab.core.models import model_family, model_size
    from deitlab.data.loaders import data_fingerprint, load_data
    from deitlab.spec.schema import DataSpec

    conv = timm.create_model("resnet18", num_classes=10)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    assert (model_family(conv), model_family(vit)) == ("convnet", "transformer")
    size = model_size(conv, 3, 224)
    assert size["params_m"] == pytest.approx(11.1816, abs=1e-4)
    # resnet18 at 224 px: 1.82 G multiply-adds (the usual figure), i.e. ~3.6 GFLOPs
    assert size["gflops"] == pytest.approx(3.63, abs=0.02)
    a, b = load_data(DataSpec(img_size=16)), load_data(DataSpec(img_size=16))
    other_split = load_data(DataSpec(img_size=16, split_seed=1))
    assert data_fingerprint(a) == data_fingerprint(b) != data_fingerprint(other_split)


def test_credentials_in_a_tracking_uri_are_refused_in_one_line(tmp_path):
    from deitlab.cli.app import app
    from deitlab.errors import SpecError
    from deitlab.spec.base import validate
    from deitlab.spec.schema import RunSpec
    from typer.testing import CliRunner

    with pytest.raises(SpecError, match="MLFLOW_TRACKING_PASSWORD"):
        validate(RunSpec, {"tracking_uri": "https://alice:pw@mlflow.internal"})
    result = CliRunner().invoke(app, ["report", "some-sweep", "--tracking-uri", "http://bob:hunter22@127.0.0.1:5000"])
    assert result.exit_code == 2 and "hunter22" not in result.output
    assert result.output.startswith("error: --tracking-uri: credentials do not belong in the tracking URI")
    assert len(result.output.strip().splitlines()) == 1


def test_bench_logging_delivers_every_value_and_reports_the_cost(tmp_path):
    from deitlab.cli.app import app
    from typer.testing import CliRunner

    out = tmp_path / "logging.json"
    result = CliRunner().invoke(app, ["bench", "logging", "--set", "optim.epochs=2", "--set", "data.batch_size=128",
                                      "--repeats", "1", "--every", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    # 12 steps per epoch at batch 128 → step metrics at steps 2, 4, …, 24 (2 values each) + 2 epochs' metrics
    assert figures["steps"] == 24 and figures["every"] == 2
    assert figures["delivered"] == figures["logged"] > 24
    assert figures["plain_step_ms"] > 0 and figures["logged_step_ms"] > 0 and figures["log_call_us"] > 0


def test_local_store_with_artifacts_in_s3(s3_endpoint, tmp_path, monkeypatch):
    """run.artifacts: s3://… with the endpoint from AWS_ENDPOINT_URL: MLflow's client writes straight to the bucket."""
    from conftest import s3_client
    from deitlab.spec.schema import RunSpec

    s3_client(s3_endpoint).create_bucket(Bucket="deitlab-artifacts")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{s3_endpoint}")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "")  # set from AWS_ENDPOINT_URL; restored after the test
    run = RunSpec(workdir=str(tmp_path), experiment="s3-artifacts", artifacts="s3://deitlab-artifacts/mlflow")
    tracking = Tracking.for_run(run)
    tracking.experiment_id()
    run_id = tracking.start_run("r")
    tracking.log_json(run_id, "evaluation/numbers.json", {"acc": 0.5})
    assert tracking.read_json(run_id, "evaluation/numbers.json") == {"acc": 0.5}
    keys = [o["Key"] for o in s3_client(s3_endpoint).list_objects_v2(Bucket="deitlab-artifacts")["Contents"]]
    assert keys == [f"mlflow/{run_id}/artifacts/evaluation/numbers.json"]
    assert tracking.artifact_location() == "s3://deitlab-artifacts/mlflow"


def test_artifact_locations_are_checked():
    from deitlab.errors import SpecError
    from deitlab.spec.base import validate
    from deitlab.spec.schema import RunSpec

    assert validate(RunSpec, {"artifacts": "/data/art"}).artifacts == "file:///data/art"
    for bad in ("s3://key:secret@bucket/x", "s3://bucket/x?endpoint_override=h", "ftp://host/x"):
        with pytest.raises(SpecError, match="run.artifacts|artifacts"):
            validate(RunSpec, {"artifacts": bad})


def test_run_figures_and_confusion_record(tmp_path):
    from deitlab.core.run_artifacts import confusion_json, confusion_png, curves_png

    history = [{"epoch": e, "train_loss": 2.0 / e, "acc_fused": 0.3 * e, "lr": 1e-3} for e in (1, 2, 3)]
    assert curves_png([], tmp_path / "none.png", "x") is None
    for path in (curves_png(history, tmp_path / "c.png", "run"), confusion_png([[3, 1], [0, 4]], tmp_path / "m.png", "m")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = confusion_json([[3, 1], [0, 0]], "fused")
    assert record["per_class_accuracy"] == [0.75, None] and record["head"] == "fused"


def test_a_new_sqlite_store_appears_whole_and_an_existing_one_is_never_replaced(tmp_path):
    from deitlab.tracking.store import _create_sqlite_store

    store = tmp_path / "mlflow.db"
    _create_sqlite_store(f"sqlite:///{store}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]  # no partial file left behind
    import sqlite3

    tables = {r[0] for r in sqlite3.connect(store).execute("select name from sqlite_master where type='table'")}
    assert {"experiments", "runs", "metrics", "alembic_version"} <= tables  # migrated before it was put in place
    other = tmp_path / "other.db"
    other.write_bytes(b"someone else's")
    _create_sqlite_store(f"sqlite:///{other}")
    assert other.read_bytes() == b"someone else's"
