"""Loss values against hand computations (math module, not torch), and against timm.task where both exist."""
import math

import pytest
import torch
from deitlab.core.distill import (
    accuracies_from_counts,
    fused_probabilities,
    ground_truth_loss,
    hard_distillation_loss,
    head_agreement_counts,
    soft_distillation_loss,
)
from deitlab.core.modes import distillation_loss


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


STUDENT = torch.tensor([[0.0, 0.0]])
TEACHER = torch.tensor([[math.log(3.0), 0.0]])  # softmax = [0.75, 0.25]


def test_soft_kl_tau1_matches_hand_value():
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.130812...
    assert soft_distillation_loss(STUDENT, TEACHER, tau=1.0).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.1308121, abs=1e-6)


def test_soft_kl_has_tau_squared_factor_and_both_normalisations():
    tau = 2.0
    p_t = softmax([math.log(3.0) / tau, 0.0])  # [0.634, 0.366]
    per_sample = tau**2 * kl(p_t, [0.5, 0.5])
    assert soft_distillation_loss(STUDENT, TEACHER, tau, "batchmean").item() == pytest.approx(per_sample, abs=1e-6)
    # official DeiT code: sum / (batch * classes) — here 1 sample × 2 classes
    assert soft_distillation_loss(STUDENT, TEACHER, tau, "official").item() == pytest.approx(per_sample / 2, abs=1e-6)


def test_soft_kl_batchmean_averages_over_samples():
    student = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0], [1.0, -1.0]])  # second sample: identical → KL 0
    expected = kl([0.75, 0.25], [0.5, 0.5]) / 2
    assert soft_distillation_loss(student, teacher, 1.0).item() == pytest.approx(expected, abs=1e-6)


def test_hard_loss_is_ce_against_teacher_argmax():
    student = torch.tensor([[2.0, 0.0]])
    teacher = torch.tensor([[0.1, 0.9]])  # argmax 1
    expected = -math.log(softmax([2.0, 0.0])[1])
    assert hard_distillation_loss(student, teacher).item() == pytest.approx(expected, abs=1e-6)


def test_ground_truth_loss_with_label_smoothing_and_soft_targets():
    logits = torch.tensor([[2.0, 0.0]])
    logp = [math.log(p) for p in softmax([2.0, 0.0])]
    smoothed = -(0.95 * logp[0] + 0.05 * logp[1])  # smoothing 0.1 over 2 classes
    assert ground_truth_loss(logits, torch.tensor([0]), 0.1).item() == pytest.approx(smoothed, abs=1e-6)
    soft_target = torch.tensor([[0.95, 0.05]])  # what timm's Mixup hands over
    assert ground_truth_loss(logits, soft_target).item() == pytest.approx(smoothed, abs=1e-6)


def test_token_soft_loss_combines_heads_with_lambda():
    cls_logits, dist_logits = torch.tensor([[2.0, 0.0]]), STUDENT
    lam, tau = 0.1, 3.0
    base = -math.log(softmax([2.0, 0.0])[0])
    kd = tau**2 * kl(softmax([math.log(3.0) / tau, 0.0]), [0.5, 0.5])
    parts = distillation_loss((cls_logits, dist_logits), torch.tensor([0]), TEACHER, mode="soft", weight=lam, tau=tau)
    assert parts.loss.item() == pytest.approx((1 - lam) * base + lam * kd, abs=1e-6)
    assert parts.base.item() == pytest.approx(base, abs=1e-6)
    assert parts.kd.item() == pytest.approx(kd, abs=1e-6)


def test_hard_token_loss_is_half_and_half_and_class_token_only_uses_one_head():
    cls_logits, dist_logits = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    teacher = torch.tensor([[0.0, 5.0]])  # teacher says class 1, ground truth says 0
    base = -math.log(softmax([2.0, 0.0])[0])
    token = distillation_loss((cls_logits, dist_logits), torch.tensor([0]), teacher, mode="hard", weight=0.5)
    assert token.loss.item() == pytest.approx(0.5 * base + 0.5 * -math.log(softmax([0.0, 1.0])[1]), abs=1e-6)
    cls_only = distillation_loss(cls_logits, torch.tensor([0]), teacher, mode="hard", weight=0.5)
    assert cls_only.loss.item() == pytest.approx(0.5 * base + 0.5 * -math.log(softmax([2.0, 0.0])[1]), abs=1e-6)


def test_none_mode_ignores_teacher_and_needs_none():
    logits = torch.tensor([[2.0, 0.0]])
    parts = distillation_loss(logits, torch.tensor([0]), None, mode="none", weight=0.0)
    assert parts.loss.item() == pytest.approx(-math.log(softmax([2.0, 0.0])[0]), abs=1e-6)
    with pytest.raises(ValueError):
        distillation_loss(logits, torch.tensor([0]), None, mode="soft", weight=0.1)


def test_gradients_flow_only_to_the_right_head():
    cls_logits = torch.zeros(1, 3, requires_grad=True)
    dist_logits = torch.zeros(1, 3, requires_grad=True)
    parts = distillation_loss((cls_logits, dist_logits), torch.tensor([0]), torch.tensor([[0.0, 0.0, 9.0]]),
                              mode="hard", weight=1.0)
    parts.loss.backward()
    assert cls_logits.grad.abs().sum() == 0  # λ = 1: the class head gets no ground-truth signal
    assert dist_logits.grad[0, 2] < 0  # pushed towards the teacher's class


@pytest.mark.parametrize("distill_type", ["soft", "hard"])
def test_agrees_with_timm_token_distillation_task(distill_type):
    timm_task = pytest.importorskip("timm.task")
    import timm

    torch.manual_seed(0)
    kwargs = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    student = timm.create_model("deit_tiny_distilled_patch16_224", **kwargs)
    teacher = timm.create_model("deit_tiny_patch16_224", **kwargs).eval()
    lam, tau = 0.3, 2.0
    task = timm_task.TokenDistillationTask(student, teacher, criterion=torch.nn.CrossEntropyLoss(),
                                           distill_type=distill_type, temperature=tau, task_loss_weight=1 - lam,
                                           verbose=False)
    images, labels = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    expected = task(images, labels)["loss"]
    student.set_distilled_training(True)
    student.train()
    with torch.no_grad():
        teacher_logits = teacher(images)
    ours = distillation_loss(student(images), labels, teacher_logits, mode=distill_type, weight=lam, tau=tau)
    assert ours.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_fused_prediction_and_agreement_counts():
    cls_logits = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.2]])
    dist_logits = torch.tensor([[0.0, 1.0], [0.0, 2.0], [4.0, 0.0]])
    probs = fused_probabilities(cls_logits, dist_logits)
    first = [(a + b) / 2 for a, b in zip(softmax([3.0, 0.0]), softmax([0.0, 1.0]))]
    assert probs[0].tolist() == pytest.approx(first, abs=1e-6)
    labels = torch.tensor([0, 1, 1])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    counts = {k: v.item() for k, v in head_agreement_counts(cls_logits, dist_logits, labels, teacher).items()}
    metrics = accuracies_from_counts(counts)
    # cls predicts [0,1,1]: 3/3; dist [1,1,0]: 1/3; fused [0,1,0]: 2/3; teacher [0,1,1]: 3/3
    assert metrics["acc_cls"] == pytest.approx(1.0)
    assert metrics["acc_dist"] == pytest.approx(1 / 3)
    assert metrics["acc_fused"] == pytest.approx(2 / 3)
    assert metrics["acc_teacher"] == pytest.approx(1.0)
    assert metrics["agreement"] == pytest.approx(2 / 3)
    assert metrics["agreement_dist"] == pytest.approx(1 / 3)
