"""Distillation modes in one place: what each mode's loss is, what it needs and how it is reported.

A mode declares its distillation term, whether it needs a teacher, whether τ applies (λ applies to every mode with a
teacher), the paper's default λ and the labels of DeiT Table 3. Spec validation, the sweep planner (which keys a trial
keeps, its name), run tags, the report's rows and plots, the step benchmark and the reference step all ask here, so a
new mode is one `register(...)` call:

    register(DistillationMode("mix", kd_term=my_term, uses_tau=True, paper_lambda=0.3, label="mixed distillation"))

`kd_term(student_logits, teacher_logits, params)` returns the distillation term; `params` is a `KDParams`.

This module imports neither torch nor anything of deitlab's at import time (spec validation asks it before torch is
loaded); the built-in terms load torch with the first loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class KDParams:
    """What a distillation term may use besides the two logits tensors."""

    tau: float = 1.0
    normalization: str = "batchmean"  # soft KL: "batchmean" (the paper's formula) or "official" (÷ batch × classes)
    hard_label_smoothing: float = 0.0


KDTerm = Callable[[Any, Any, KDParams], Any]  # (student logits, teacher logits, params) -> a scalar tensor


@dataclass(frozen=True)
class DistillationMode:
    """One distillation mode. `kd_term` None: no teacher, the loss is the ground-truth term alone."""

    name: str
    kd_term: KDTerm | None = None
    uses_tau: bool = False
    paper_lambda: float = 0.0
    label: str = ""  # DeiT Table 3's method name of a class-token-only line ("usual distillation")
    token_label: str = ""  # the prefix of the three lines of a distillation-token training ("DeiT⚗")
    label_type: str = ""  # what the student learns from the teacher, Table 3's "label" column ("soft", "hard")

    @property
    def needs_teacher(self) -> bool:
        return self.kd_term is not None

    @property
    def uses_lambda(self) -> bool:
        return self.needs_teacher

    @property
    def method(self) -> str:
        return self.label or self.name

    @property
    def token_method(self) -> str:
        return self.token_label or f"DeiT⚗ ({self.name})"

    @property
    def label_column(self) -> str:
        return (self.label_type or self.name) if self.needs_teacher else "—"


_MODES: dict[str, DistillationMode] = {}


def register(mode: DistillationMode) -> DistillationMode:
    """Add a mode (or replace one of the same name). Modes keep their registration order: the report's row order."""
    if not mode.name or not mode.name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"distillation mode name {mode.name!r}: letters, digits, _ and -")
    if not 0.0 <= mode.paper_lambda <= 1.0:
        raise ValueError(f"distillation mode {mode.name!r}: paper_lambda must be within [0, 1]")
    _MODES[mode.name] = mode
    return mode


def unregister(name: str) -> None:
    _MODES.pop(name, None)


def names() -> list[str]:
    return list(_MODES)


def get(name: str) -> DistillationMode:
    """The registered mode called `name`; ValueError naming the known ones otherwise."""
    try:
        return _MODES[name]
    except KeyError:
        raise ValueError(f"unknown distillation mode '{name}': expected one of {', '.join(_MODES)}") from None


def describe(name: str) -> DistillationMode:
    """The mode called `name` as the report reads it back from MLflow: the registered one, or, for a mode registered
    only in the process that trained it, one that needs a teacher and keeps τ (so different τ are never merged)."""
    return _MODES.get(name) or DistillationMode(name, kd_term=_unknown_term, uses_tau=True)


def order(name: str) -> int:
    """The mode's place in registration order (unknown modes last)."""
    return names().index(name) if name in _MODES else len(_MODES)


def _unknown_term(student, teacher, params: KDParams):
    raise ValueError("this distillation mode is not registered in this process")


# ------------------------------------------------------------------------------------------------ the loss
def distillation_loss(outputs, target, teacher_logits, *, mode: str, weight: float, tau: float = 1.0,
                      normalization: str = "batchmean", label_smoothing: float = 0.0,
                      hard_label_smoothing: float = 0.0):
    """The training loss, as distill.LossParts: (1 - λ) · CE(Z_cls, y) + λ · kd(Z_dist, Z_t) for a mode with a
    teacher, CE(Z_cls, y) for one without. `outputs` is (cls, dist) logits with the token, one tensor without it."""
    from deitlab.core import distill

    found = get(mode)
    cls_logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
    base = distill.ground_truth_loss(cls_logits, target, label_smoothing)
    if not found.needs_teacher:
        return distill.LossParts(base, base.detach(), base.detach() * 0)
    if teacher_logits is None:
        raise ValueError(f"distillation mode '{mode}' needs teacher logits")
    kd = found.kd_term(dist_logits, teacher_logits, KDParams(tau, normalization, hard_label_smoothing))
    return distill.LossParts((1 - weight) * base + weight * kd, base.detach(), kd.detach())


def _soft_term(student, teacher, params: KDParams):
    from deitlab.core.distill import soft_distillation_loss

    return soft_distillation_loss(student, teacher, params.tau, params.normalization)


def _hard_term(student, teacher, params: KDParams):
    from deitlab.core.distill import hard_distillation_loss

    return hard_distillation_loss(student, teacher, params.hard_label_smoothing)


NONE = register(DistillationMode("none", label="no distillation"))
SOFT = register(DistillationMode("soft", kd_term=_soft_term, uses_tau=True, paper_lambda=0.1,
                                 label="usual distillation", token_label="DeiT⚗ (soft)", label_type="soft"))
HARD = register(DistillationMode("hard", kd_term=_hard_term, paper_lambda=0.5, label="hard distillation",
                                 token_label="DeiT⚗", label_type="hard"))
