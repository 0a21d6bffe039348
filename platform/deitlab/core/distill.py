"""DeiT distillation loss terms and joint-head evaluation: pure torch functions, no ray, no mlflow. The modes that
combine the terms into a loss (and whatever else a mode decides) are in modes.py.

Soft:  L = (1 - λ) · CE(Z_cls, y) + λ · τ² · KL(ψ(Z_t/τ) ‖ ψ(Z_dist/τ))
Hard:  L = (1 - λ) · CE(Z_cls, y) + λ · CE(Z_dist, argmax Z_t)           (the paper's ½ + ½ is λ = 0.5)
None:  L = CE(Z_cls, y)

With the distillation token, Z_cls and Z_dist are the two heads; without it (class-token-only KD, DeiT Table 3 rows
2-3) both terms apply to the single class head. y is the ground truth: integer labels with label smoothing, or the
soft targets that timm's Mixup/CutMix produce (smoothing already folded in).

KL normalisation (`normalization`):
- "batchmean" (default): KL summed over classes, averaged over the batch — the per-sample KL of the paper's formula
  and of timm's KD tasks.
- "official": KL summed over everything and divided by batch × classes, as the official DeiT code does; the term is
  `num_classes` times weaker, which is why the paper's λ = 0.1 was tuned with it.

We keep our own small functions instead of timm.task's TokenDistillationTask because that has no class-token-only hard
KD, no official normalisation and does not expose the teacher logits we need for agreement; tests check that the
batchmean soft and the hard terms agree with timm.task where both exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Normalization = Literal["batchmean", "official"]


@dataclass
class LossParts:
    loss: torch.Tensor
    base: torch.Tensor  # ground-truth term on the class head
    kd: torch.Tensor  # distillation term (0 in mode none)


def ground_truth_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with integer labels (smoothed here) or with soft targets (mixup/cutmix, already smoothed)."""
    if target.dtype.is_floating_point:
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def soft_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float,
                           normalization: Normalization = "batchmean") -> torch.Tensor:
    """τ² · KL(teacher ‖ student) on temperature-scaled softmaxes."""
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="sum", log_target=True)
    denominator = student_logits.shape[0] if normalization == "batchmean" else student_logits.numel()
    return kl * (tau * tau) / denominator


def hard_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against the teacher's argmax label."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1), label_smoothing=label_smoothing)


# ---------------------------------------------------------------------------------------------------- evaluation
ACCURACY_KEYS = ("acc_cls", "acc_dist", "acc_fused", "acc_teacher", "agreement")


Fusion = Literal["logits", "softmax"]


def fused_probabilities(cls_logits: torch.Tensor, dist_logits: torch.Tensor) -> torch.Tensor:
    """Joint classifier as the paper words it: the mean of the two heads' softmax outputs."""
    return 0.5 * (F.softmax(cls_logits.float(), dim=-1) + F.softmax(dist_logits.float(), dim=-1))


def fused_logits(cls_logits: torch.Tensor, dist_logits: torch.Tensor) -> torch.Tensor:
    """Joint classifier as the official DeiT code and timm's distilled ViT compute it: the mean of the logits. The
    argmax can differ from the softmax mean's: a head that is confident (large logit gaps) weighs more here."""
    return 0.5 * (cls_logits.float() + dist_logits.float())


def head_predictions(cls_logits: torch.Tensor, dist_logits: torch.Tensor,
                     fusion: Fusion = "logits") -> dict[str, torch.Tensor]:
    """The predicted class of each head: cls, dist and fused (by `fusion`)."""
    fused = fused_logits if fusion == "logits" else fused_probabilities
    return {"cls": cls_logits.argmax(-1), "dist": dist_logits.argmax(-1),
            "fused": fused(cls_logits, dist_logits).argmax(-1)}


def confusion_counts(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A num_classes × num_classes count matrix: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def head_agreement_counts(cls_logits: torch.Tensor, dist_logits: torch.Tensor, labels: torch.Tensor,
                          teacher_logits: torch.Tensor | None,
                          predictions: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Correct-prediction and agreement counts for one batch (sums, so ranks can all-reduce them)."""
    predictions = predictions or head_predictions(cls_logits, dist_logits)
    counts = {f"correct_{k}": (p == labels).sum() for k, p in predictions.items()}
    if teacher_logits is not None:
        teacher_pred = teacher_logits.argmax(-1)
        counts["correct_teacher"] = (teacher_pred == labels).sum()
        counts.update({f"agree_{k}": (p == teacher_pred).sum() for k, p in predictions.items()})
    counts["count"] = torch.tensor(labels.numel(), device=labels.device)
    return counts


def accuracies_from_counts(counts: dict[str, float]) -> dict[str, float]:
    """acc_cls, acc_dist, acc_fused, and with a teacher acc_teacher and agreement (fused vs teacher) + per head."""
    n = max(float(counts["count"]), 1.0)
    metrics = {f"acc_{k}": float(counts[f"correct_{k}"]) / n for k in ("cls", "dist", "fused")}
    if "correct_teacher" in counts:
        metrics["acc_teacher"] = float(counts["correct_teacher"]) / n
        metrics["agreement"] = float(counts["agree_fused"]) / n
        metrics["agreement_cls"] = float(counts["agree_cls"]) / n
        metrics["agreement_dist"] = float(counts["agree_dist"]) / n
    return metrics
