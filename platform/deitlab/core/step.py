"""The lean distillation step: one batch and one teacher forward feed one or more students. torch + timm only.

What makes it lean (and what `deitlab bench step` compares against the official DeiT step, `reference.py`):
- bf16 autocast on CUDA, so no gradient scaler; fused AdamW on CUDA (one kernel for all parameters);
- the teacher frozen in `torch.inference_mode`, its weights in bf16 and channels-last (convnets run faster so);
- optional `torch.compile` of students and teacher (`run.compile`);
- no host synchronisation in the step: losses are summed on the device and read once per log interval or epoch;
  gradients are dropped (`set_to_none`), not zeroed.

A *pack* is several students trained in lockstep on the same batches: each has its own loss (mode, τ, λ), optimiser,
schedule, RNG stream, history and stop reason, and the teacher's logits are computed once per batch for all of them.
Each student draws dropout / drop-path randomness from its own stream, seeded per (seed, rank, epoch), so a packed
student computes exactly what it computes when trained alone.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from deitlab.core import modes


@dataclass(frozen=True)
class LossConfig:
    mode: str = "none"
    weight: float = 0.0
    tau: float = 1.0
    normalization: str = "batchmean"
    label_smoothing: float = 0.1
    hard_label_smoothing: float = 0.0

    @property
    def needs_teacher(self) -> bool:
        return modes.get(self.mode).needs_teacher

    @classmethod
    def from_specs(cls, distillation, augment) -> LossConfig:
        return cls(distillation.mode, distillation.weight, distillation.tau, distillation.soft_normalization,
                   augment.label_smoothing, distillation.hard_label_smoothing)


def autocast(enabled: bool, device: torch.device):
    """bf16 autocast on CUDA when enabled; nothing otherwise (CPU runs fp32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lean_optimizer(model: nn.Module, opt: str, *, lr: float, weight_decay: float, device: torch.device):
    """timm's optimiser factory (no weight decay on norms, biases and tokens), fused on CUDA for Adam(W)."""
    from timm.optim import create_optimizer_v2

    extra = {"fused": True} if device.type == "cuda" and opt.lower() in ("adam", "adamw") else {}
    return create_optimizer_v2(model, opt, lr=lr, weight_decay=weight_decay, **extra)


def prepare_teacher(teacher: nn.Module, device: torch.device, *, amp: bool, compile: bool = False) -> nn.Module:
    """The frozen teacher on `device`: eval mode, no gradients; on CUDA channels-last, bf16 weights with amp."""
    teacher = teacher.to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        teacher = teacher.to(memory_format=torch.channels_last)
        if amp:  # what teacher_cache.teacher_dtype says: the cache's key names the dtype
            teacher = teacher.to(dtype=torch.bfloat16)
    return torch.compile(teacher) if compile else teacher


def teacher_logits(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the frozen teacher, computed once per batch (shared by every student of a pack)."""
    dtype = next(teacher.parameters()).dtype
    with torch.inference_mode():
        x = images.to(dtype=dtype, memory_format=torch.channels_last) if images.is_cuda else images.to(dtype)
        logits = teacher(x).float()
    return logits.clone()  # a normal tensor again: the loss saves it for backward, inference tensors can't be


def _stochastic(model: nn.Module) -> bool:
    """Does a training forward draw random numbers (dropout, timm's drop-path)?"""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        if type(module).__name__ == "DropPath" and getattr(module, "drop_prob", 0) > 0:
            return True
    return False


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


DIVERGED_REASON = "training loss is not finite"  # how a diverged student's `stopped` starts; other reasons: stopped


class Student:
    """One trainable model with everything that is its own in a pack."""

    def __init__(self, name: str, model: nn.Module, loss: LossConfig, optimizer, scheduler=None, *,
                 device: torch.device, amp: bool, clip_grad: float | None = None, seed: int = 0,
                 eval_head: str = "fused", trainable: nn.Module | None = None, compile: bool = False,
                 fusion: str = "logits"):
        self.name, self.model, self.loss, self.optimizer, self.scheduler = name, model, loss, optimizer, scheduler
        self.device, self.amp, self.clip_grad, self.seed, self.eval_head = device, amp, clip_grad, seed, eval_head
        self.fusion = fusion
        trainable = trainable if trainable is not None else model
        self.trainable = torch.compile(trainable) if compile else trainable
        self.stochastic = _stochastic(model)
        self.history: list[dict[str, float]] = []  # every completed epoch's metrics, kept in checkpoints
        self.confusion: list[list[int]] | None = None  # the last evaluation's confusion matrix (eval head)
        self.stopped: str | None = None  # why it no longer trains (diverged, stopped by a scheduler)
        # Called every `log_every_steps` optimiser steps with ({"train_loss_step", "lr_step"}, global step).
        self.on_step: Callable[[dict[str, float], int], None] | None = None
        self.sums = torch.zeros(3, device=device)  # this epoch's loss, base and kd terms, summed on the device
        self.last_loss: torch.Tensor | None = None
        self._rng = None

    # ------------------------------------------------------------------------------------------------ randomness
    def begin_epoch(self, seed: int) -> None:
        """Fresh loss sums; this student's own RNG stream for the epoch, from `seed`."""
        self.trainable.train()
        self.sums.zero_()
        if self.stochastic:
            outer = _rng_state(self.device)
            torch.manual_seed(seed)
            self._rng = _rng_state(self.device)
            _set_rng_state(outer, self.device)

    @contextlib.contextmanager
    def own_rng(self):
        """Draw from this student's stream, leaving the shared stream (augmentation) where it was."""
        if not self.stochastic:
            yield
            return
        outer = _rng_state(self.device)
        _set_rng_state(self._rng, self.device)
        try:
            yield
        finally:
            self._rng = _rng_state(self.device)
            _set_rng_state(outer, self.device)

    # ------------------------------------------------------------------------------------------------ the step
    def step(self, images: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
             global_step: int) -> None:
        """Forward, loss, backward, clip, optimiser and schedule: no host synchronisation."""
        c = self.loss
        with self.own_rng():
            with autocast(self.amp, self.device):
                outputs = self.trainable(images)
            parts = modes.distillation_loss(
                outputs, targets, teacher_logits if c.needs_teacher else None, mode=c.mode, weight=c.weight,
                tau=c.tau, normalization=c.normalization, label_smoothing=c.label_smoothing,
                hard_label_smoothing=c.hard_label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            parts.loss.backward()
        if self.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step_update(global_step)
        self.last_loss = parts.loss.detach()
        self.sums += torch.stack([self.last_loss, parts.base, parts.kd])

    def step_metrics(self) -> dict[str, float]:
        """The last step's loss and the learning rate (one host sync: called once per log interval)."""
        return {"train_loss_step": self.last_loss.item(), "lr_step": self.optimizer.param_groups[0]["lr"]}

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self, epoch: int) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else {}, "epoch": epoch,
                "history": self.history, "stopped": self.stopped}

    def load_state_dict(self, state: dict, epoch: int) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.history = list(state.get("history", []))[:epoch]
        self.stopped = state.get("stopped")


def train_step(students: list[Student], teacher: nn.Module | None, images: torch.Tensor, targets: torch.Tensor,
               global_step: int, logits: torch.Tensor | None = None) -> None:
    """One step of every student still training, on one batch, with one teacher forward between them (or the
    teacher's `logits` given: the teacher-logit cache's)."""
    active = [s for s in students if s.stopped is None]
    if logits is None and teacher is not None and any(s.loss.needs_teacher for s in active):
        logits = teacher_logits(teacher, images)
    for student in active:
        student.step(images, targets, logits, global_step)
