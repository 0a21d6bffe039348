"""A distillation mode defined in this file only — half soft, half hard — registered and run through spec → plan →
engine → report, with no other file touched: every layer asks the mode registry, none spells the modes out."""
import math

import pytest
import torch
from deitlab.core import modes
from deitlab.core.distill import hard_distillation_loss, soft_distillation_loss
from deitlab.core.engine import experiment_engine
from deitlab.core.models import build_classifier, save_model
from deitlab.errors import SpecError
from deitlab.orchestration.sweep import planned_trials
from deitlab.report.model import build_report
from deitlab.spec.base import validate
from deitlab.spec.schema import ExperimentSpec
from deitlab.spec.sweep import SweepSpec
from deitlab.tracking.names import KIND_TAG, SWEEP_TAG
from deitlab.tracking.store import Tracking

CPU = torch.device("cpu")
CALLS = []  # (student logits shape) per call of the mixed term: proof the engine's step asked the registry


def mixed_term(student, teacher, params: modes.KDParams):
    CALLS.append(tuple(student.shape))
    return 0.5 * soft_distillation_loss(student, teacher, params.tau, params.normalization) + \
        0.5 * hard_distillation_loss(student, teacher, params.hard_label_smoothing)


@pytest.fixture
def mixed():
    mode = modes.register(modes.DistillationMode(
        "mixed", kd_term=mixed_term, uses_tau=True, paper_lambda=0.3, label="mixed distillation",
        token_label="DeiT⚗ (mixed)", label_type="soft+hard"))
    CALLS.clear()
    yield mode
    modes.unregister("mixed")


def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_the_loss_of_a_registered_mode_by_hand(mixed):
    cls_logits, dist_logits = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    teacher = torch.tensor([[0.0, 2.0]])
    parts = modes.distillation_loss((cls_logits, dist_logits), torch.tensor([0]), teacher, mode="mixed", weight=0.3,
                                    tau=2.0)
    base = -math.log(softmax([1.0, 0.0])[0])
    p_t, p_s = softmax([0.0, 1.0]), softmax([0.0, 0.5])  # teacher and student at τ = 2
    soft = 4.0 * sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    hard = -math.log(softmax([0.0, 1.0])[1])  # the teacher's argmax is class 1
    assert parts.loss.item() == pytest.approx(0.7 * base + 0.3 * (0.5 * soft + 0.5 * hard), abs=1e-6)
    assert parts.kd.item() == pytest.approx(0.5 * soft + 0.5 * hard, abs=1e-6)


def test_a_mode_registered_in_a_test_runs_from_spec_to_report(mixed, tmp_path):
    torch.manual_seed(0)
    teacher = build_classifier("test_resnet", {}, num_classes=10, in_chans=1)
    path = save_model(tmp_path / "teacher.pt", teacher, arch="test_resnet", model_kwargs={}, num_classes=10,
                      in_chans=1)
    student = {"patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 1}

    # spec: the mode validates, takes its paper λ, and needs a teacher like every mode with a kd term
    spec = validate(ExperimentSpec, {"student": student, "teacher": {"checkpoint": str(path)},
                                     "distillation": {"mode": "mixed", "tau": 2.0}, "optim": {"epochs": 2}})
    assert spec.distillation.weight == 0.3 and spec.distillation.uses_token
    with pytest.raises(SpecError, match="distillation mode 'mixed' needs a 'teacher' section"):
        validate(ExperimentSpec, {"student": student, "distillation": {"mode": "mixed"}}, source="exp.yaml")
    with pytest.raises(SpecError, match="Input should be 'none', 'soft', 'hard' or 'mixed' \\(got 'medium'\\)"):
        validate(ExperimentSpec, {"student": student, "distillation": {"mode": "medium"}}, source="exp.yaml")

    # plan: τ stays with the mixed trials (it uses τ), leaves hard and none; none keeps no λ either
    sweep = validate(SweepSpec, {
        "name": "mix", "experiment": {"student": student, "teacher": {"checkpoint": str(path)},
                                      "optim": {"epochs": 1}, "run": {"workdir": str(tmp_path)}},
        "grid": {"distillation.mode": ["none", "hard", "mixed"], "distillation.tau": [1.0, 4.0]}})
    trials = planned_trials(sweep)
    assert list(trials) == ["none-s0", "hard-s0", "mixed-t1-s0", "mixed-t4-s0"]
    assert trials["mixed-t4-s0"].distillation.tau == 4.0 and trials["mixed-t4-s0"].distillation.weight == 0.3

    # engine: the step computes the registered term, once per training step, on the distillation head
    engine = experiment_engine(trials["mixed-t4-s0"], str(path), device=CPU)
    history = list(engine.run(1))
    assert len(CALLS) == len(engine.train_loader) > 0 and all(shape[1] == 10 for shape in CALLS)
    assert history[-1]["train_kd_loss"] > 0 and math.isfinite(history[-1]["train_loss"])

    # report: the runs as MLflow holds them; the mixed rows keep their τ, and are labelled by the mode
    tracking = Tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", "modes", (tmp_path / "art").as_uri())
    tracking.experiment_id()
    parent = tracking.start_run("mix", tags={SWEEP_TAG: "mix", KIND_TAG: "sweep"})
    for i, (name, trial) in enumerate(trials.items()):
        run_id = tracking.start_run(name, params=trial.flat_params(), parent_id=parent)
        acc = 0.5 + 0.1 * i
        tracking.log_metrics(run_id, {"acc": acc, "acc_cls": acc, "acc_dist": acc, "acc_fused": acc}, step=1)
        tracking.end_run(run_id)
    tracking.end_run(parent)
    report = build_report(tracking, "mix")
    assert [(r.mode, r.tau, r.lam) for r in report.rows] == [
        ("none", None, None), ("hard", None, 0.5), ("mixed", 1.0, 0.3), ("mixed", 4.0, 0.3)]
    lines = report.table3
    assert [line.method for line in lines] == [
        "no distillation", "DeiT⚗: class embedding", "DeiT⚗: distil. embedding", "DeiT⚗: class+distillation",
        *[f"DeiT⚗ (mixed): {head}" for _ in range(2)
          for head in ("class embedding", "distil. embedding", "class+distillation")]]
    assert {line.label for line in lines if "mixed" in line.method} == {"soft+hard"}
    assert [t.teacher for t in report.teachers] == ["teacher"]
    assert report.teachers[0].best_config == "mixed τ=4 λ=0.3"
