"""Packed sweeps: trials that share a teacher train as one Ray Train run, yet each is its own MLflow child run,
stops alone (ASHA, a diverged loss) and records what the same trial records alone."""
import json
import math

import pytest
import timm
import torch
from conftest import TINY_STUDENT, write_yaml
from deitlab.cli.app import app
from deitlab.core.checkpoints import Storage
from deitlab.core.engine import experiment_engine, pick_device
from deitlab.core.models import save_model
from deitlab.core.teacher_cache import list_caches
from deitlab.orchestration.sweep import planned_trials
from deitlab.spec.loading import load_sweep
from mlflow import MlflowClient
from typer.testing import CliRunner

pytestmark = pytest.mark.integration


def test_a_pack_trains_its_members_as_if_alone_and_stops_them_one_by_one(ray_session, tmp_path):
    torch.manual_seed(0)
    teacher = save_model(tmp_path / "teacher.pt", timm.create_model("test_resnet", num_classes=10, in_chans=1),
                         arch="test_resnet", model_kwargs={}, num_classes=10, in_chans=1)
    workdir = tmp_path / "work"
    good = {"distillation.mode": ["none", "soft", "hard"], "teacher": ["convnet"]}
    hopeless = {"distillation.mode": ["hard"], "teacher": ["convnet"], "optim.lr": [1e-7]}
    diverging = {"distillation.mode": ["hard"], "teacher": ["convnet"], "optim.lr": [1e9]}
    raw = {"name": "sw-pack", "pack": 8, "teachers": {"convnet": {"checkpoint": str(teacher)}},
           "grid": [good, hopeless, diverging], "early_stopping": {"grace_period": 1, "reduction_factor": 2},
           "experiment": {"name": "packed", "student": TINY_STUDENT, "distillation": {"mode": "none"},
                          "data": {"augment": {"rotate": 0, "translate": 0, "scale": [1, 1]}},
                          "optim": {"epochs": 3, "warmup_epochs": 0}, "run": {"workdir": str(workdir)}}}
    path = write_yaml(tmp_path / "sweep.yaml", json.dumps(raw))
    specs = planned_trials(load_sweep(path))
    assert len(specs) == 5

    result = CliRunner().invoke(app, ["sweep", "run", str(path)])
    assert result.exit_code in (0, 1), result.output  # 1: a trial failed (the diverging one)

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sw-pack").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment], "tags.`deitlab.kind` = 'trial'")}
    assert sorted(runs) == sorted(specs)
    packs = {r.data.tags["deitlab.pack"] for r in runs.values()}
    assert len(packs) == 1 and all(r.data.tags["deitlab.pack_size"] == "5" for r in runs.values())
    ray_runs = [p for p in (workdir / "ray_results").glob("*/") if p.name.startswith("pack-")]
    assert len(ray_runs) == 1  # one Ray Train run trained all five

    diverged = runs["hard-convnet-lr1e+09-s0"]
    assert diverged.info.status == "FAILED"
    assert diverged.data.tags["deitlab.diverged"].startswith("training loss is not finite at epoch")
    stopped = runs["hard-convnet-lr1e-07-s0"]
    assert stopped.info.status == "KILLED" and stopped.data.metrics["epoch"] == 1
    assert stopped.data.tags["deitlab.stopped_early"].startswith("ASHA at epoch 1 of 3")

    reference = runs["none-s0"]  # first at every rung: never stopped
    assert reference.info.status == "FINISHED" and reference.data.metrics["epoch"] == 3
    for name, run in runs.items():
        spec = specs[name]
        assert run.data.params["distillation.mode"] == spec.distillation.mode
        assert run.data.tags["deitlab.mode"] == spec.distillation.mode
        if run.info.status == "FINISHED":
            artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
            assert {"evaluation/curves.png", "evaluation/confusion_matrix.json"} <= artifacts, name
            best = client.get_logged_model(run.data.tags["deitlab.best_model_uri"].removeprefix("models:/"))
            assert best.source_run_id == run.info.run_id and best.name == "best_model"
            assert [a.path for a in client.list_logged_model_artifacts(best.model_id)] == ["model.pt"]
            assert {m.key for m in best.metrics} >= {"acc", "acc_teacher", "agreement"}, name
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "acc")]
            assert steps == [1, 2, 3], name

    # The packed record equals the same trial trained alone, with no Ray and no MLflow.
    spec = specs["none-s0"]
    alone = list(experiment_engine(spec, str(teacher), device=pick_device(spec.run)).run(3))
    for key in ("acc", "acc_teacher", "val_loss", "train_loss"):
        logged = [m.value for m in sorted(client.get_metric_history(reference.info.run_id, key), key=lambda m: m.step)]
        assert all(math.isclose(a, m[key], rel_tol=1e-5, abs_tol=1e-6) for a, m in zip(logged, alone)), key

    # The pack computed its teacher's logits once and wrote them; a second sweep with the same teacher and recipe
    # (other trials, other students) runs its teacher zero times, and records the same metrics as it would live.
    tags = reference.data.tags
    forwards = int(tags["deitlab.teacher_forwards"])  # every training batch, and the validation set once
    summary = tags["deitlab.teacher_cache"]  # later evaluations read the validation logits the first one wrote
    batches = int(summary.split(" of ")[1].split()[0])
    assert forwards > 0 and summary == f"read {batches - forwards}, written {forwards} of {batches} batches"
    key = tags["deitlab.teacher_cache.key"]
    (entry,) = list_caches(Storage.open(str(workdir / "ray_results"), create=False))
    # Epochs in which ASHA had left only the `none` member needed no teacher logits, and none were written.
    held = entry.epochs
    assert entry.key == key and held == list(range(len(held))) and held and entry.val
    again = {**raw, "name": "sw-pack-again", "grid": [{"distillation.mode": ["soft", "hard"], "teacher": ["convnet"],
                                                        "distillation.lambda": [0.3]}]}
    again["experiment"] = {**raw["experiment"], "optim": {"epochs": len(held), "warmup_epochs": 0}}
    again.pop("early_stopping")
    path = write_yaml(tmp_path / "again.yaml", json.dumps(again))
    planned = CliRunner().invoke(app, ["sweep", "plan", str(path)])  # says so before anything runs
    assert planned.exit_code == 0, planned.output
    assert f"{key[:8]} {len(held)}/{len(held)}" in planned.output
    assert f"{key[:8]}: {len(held)}/{len(held)} epochs held\n" in planned.output
    assert "this sweep writes about 0 B of teacher logits" in planned.output
    result = CliRunner().invoke(app, ["sweep", "run", str(path)])
    assert result.exit_code == 0, result.output
    second = client.get_experiment_by_name("sw-pack-again").experiment_id
    trials = client.search_runs([second], "tags.`deitlab.kind` = 'trial'")
    assert len(trials) == 2
    for run in trials:
        assert run.data.tags["deitlab.teacher_forwards"] == "0", run.info.run_name
        assert run.data.tags["deitlab.teacher_cache.key"] == key
        read = int(run.data.tags["deitlab.teacher_cache"].split()[1])
        assert run.data.tags["deitlab.teacher_cache"] == f"read {read} of {read} batches" and read > 0
        assert int(run.data.tags["deitlab.teacher_cache.checked"]) == 2 * len(held)  # training + validation passes
    cached = next(r for r in trials if r.info.run_name.startswith("soft"))
    spec = planned_trials(load_sweep(path))[cached.info.run_name]
    live = list(experiment_engine(spec, str(teacher), device=pick_device(spec.run)).run(len(held)))  # no cache
    logged = [m.value for m in sorted(client.get_metric_history(cached.info.run_id, "train_loss"), key=lambda m: m.step)]
    assert all(math.isclose(a, m["train_loss"], rel_tol=1e-5, abs_tol=1e-6) for a, m in zip(logged, live))


def test_the_live_table_shows_members_and_one_sampler_feeds_every_members_system_metrics(ray_session, tmp_path):
    import io

    from deitlab.orchestration.progress import TrialTable
    from deitlab.orchestration.sweep import run_sweep
    from deitlab.orchestration.train import MEMBERS_KEY
    from ray.tune import Callback
    from rich.console import Console

    torch.manual_seed(0)
    teacher = save_model(tmp_path / "teacher.pt", timm.create_model("test_resnet", num_classes=10, in_chans=1),
                         arch="test_resnet", model_kwargs={}, num_classes=10, in_chans=1)
    workdir = tmp_path / "work"
    raw = {"name": "sw-table", "pack": 8, "teachers": {"convnet": {"checkpoint": str(teacher)}},
           "grid": [{"distillation.mode": ["none"], "teacher": ["convnet"]},
                    {"distillation.mode": ["hard"], "teacher": ["convnet"], "optim.lr": [1e-7, 1e9]}],
           "early_stopping": {"grace_period": 1, "reduction_factor": 2},
           "experiment": {"name": "table", "student": TINY_STUDENT, "distillation": {"mode": "none"},
                          "data": {"augment": {"rotate": 0, "translate": 0, "scale": [1, 1]}},
                          "optim": {"epochs": 3, "warmup_epochs": 0}, "run": {"workdir": str(workdir)}}}
    sweep = load_sweep(write_yaml(tmp_path / "sweep.yaml", json.dumps(raw)))
    specs = planned_trials(sweep)
    names = sorted(specs)
    hopeless, diverging, reference = "hard-convnet-lr1e-07-s0", "hard-convnet-lr1e+09-s0", "none-s0"
    assert sorted([hopeless, diverging, reference]) == names

    seen: list[tuple[dict, dict[str, str]]] = []  # each pack result, and the rows' states right after it

    class Watch(Callback):  # runs after the table (callbacks are called in order)
        def on_trial_result(self, iteration, trials, trial, result, **info):
            seen.append((result, {n: r.state for n, r in table.rows.items()}))

    log = io.StringIO()
    table = TrialTable(Console(file=log, width=200), "sweep sw-table", {n: s.optim.epochs for n, s in specs.items()})
    with table:
        outcome = run_sweep(sweep, callbacks=[table, Watch()])
    assert outcome.failed == [diverging]

    # Rows are the members; the pack Tune ran has none. States: as MLflow closed each run.
    recorded = Console(file=io.StringIO(), width=200, record=True)
    recorded.print(table.render())
    rendered = recorded.export_text()
    assert "pack-" not in rendered and sorted(table.rows) == names
    lines = {n: next(ln for ln in rendered.splitlines() if f" {n} " in ln) for n in names}
    assert "finished" in lines[reference] and "3/3" in lines[reference]
    assert "stopped" in lines[hopeless] and "1/3" in lines[hopeless]
    assert "failed" in lines[diverging]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sw-table").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment], "tags.`deitlab.kind` = 'trial'")}
    status = {"FINISHED": "finished", "KILLED": "stopped", "FAILED": "failed"}
    assert {n: table.rows[n].state for n in names} == {n: status[runs[n].info.status] for n in names}
    assert math.isclose(table.rows[reference].best, max(m.value for m in client.get_metric_history(
        runs[reference].info.run_id, "acc")), rel_tol=1e-9)
    # The end-of-trial lines name members.
    ended = [ln for ln in log.getvalue().splitlines() if ln.strip().startswith(("✓", "■", "✗"))]
    assert sorted(ln.split()[1] for ln in ended) == names

    # While the pack trained on, its stopped member already showed as stopped.
    after_stop = [states for result, states in seen if states.get(hopeless) == "stopped"]
    assert after_stop and after_stop[0][reference] == "running"
    # Tune still sees the pack's best member value this epoch (what it ranks checkpoints by).
    for result, _ in seen:
        if MEMBERS_KEY in result and "acc" in result:
            this_epoch = [m["acc"] for m in result[MEMBERS_KEY].values() if m["epoch"] == result["epoch"]
                          and m["state"] != "failed"]
            assert result["acc"] == max(this_epoch)

    # System metrics: one sampler for the node, its samples in every member's run — the same timestamps and values.
    histories = {n: sorted((m.timestamp, m.value) for m in client.get_metric_history(
        runs[n].info.run_id, "system/cpu_utilization_percentage")) for n in names}
    assert histories[reference], "no system metrics recorded"
    assert all(h == histories[reference] for h in histories.values()), histories
