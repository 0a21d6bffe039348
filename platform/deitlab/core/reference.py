"""A replica of the official DeiT training step, the yardstick of `deitlab bench step`. Not used for training.

Written from the semantics of facebookresearch/deit (main.py, engine.py `train_one_epoch`, losses.py
`DistillationLoss`), with what that code does on every step:
- mixup/cutmix (timm Mixup) on the device, then fp16 autocast around the student forward *and* the loss, whose
  teacher forward runs inside it under `torch.no_grad` (not inference mode, no channels-last, fp32 weights);
- the loss: base criterion (soft-target CE with mixup, label-smoothing CE without) weighted by 1 - α, plus α times
  soft KL · τ² / (batch × classes) or hard CE against the teacher's argmax;
- `loss.item()` and a finiteness check (a host sync), `zero_grad()` to zeros, GradScaler backward/step/update
  (unscale + clip when clipping), then `torch.cuda.synchronize()`;
- AdamW as PyTorch's per-parameter loop (`foreach=False`: the official code predates multi-tensor kernels),
  no weight decay on 1-D parameters and the model's `no_weight_decay()` tokens.
On CPU autocast and the scaler are off (fp32), which is where `tests/` checks the lean step against it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deitlab.core import modes


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class ReferenceStep:
    """One official-semantics training step per call: `step(images, labels) -> loss value (float)`."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, *, mode: str, alpha: float, tau: float,
                 lr: float, weight_decay: float, label_smoothing: float, mixup=None, clip_grad: float | None = None,
                 normalization: str = "official"):
        self.student, self.teacher, self.mixup = student, teacher, mixup
        self.mode, self.alpha, self.tau, self.normalization = mode, alpha, tau, normalization
        self.label_smoothing, self.clip_grad = label_smoothing, clip_grad
        self.device = next(student.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(_param_groups(student, weight_decay), lr=lr, foreach=False, fused=False)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda)
        if teacher is not None:
            teacher.eval()

    def _base(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.dtype.is_floating_point:  # mixup/cutmix soft targets: SoftTargetCrossEntropy
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        log_probs = F.log_softmax(logits, dim=-1)  # LabelSmoothingCrossEntropy
        nll = -log_probs.gather(dim=-1, index=targets.unsqueeze(1)).squeeze(1)
        return ((1 - self.label_smoothing) * nll - self.label_smoothing * log_probs.mean(dim=-1)).mean()

    def loss(self, inputs: torch.Tensor, outputs, targets: torch.Tensor) -> torch.Tensor:
        """DistillationLoss: the teacher's forward happens here, inside the caller's autocast."""
        cls_out, dist_out = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        base = self._base(cls_out, targets)
        mode = modes.get(self.mode)
        if not mode.needs_teacher:
            return base
        with torch.no_grad():
            teacher_out = self.teacher(inputs)
        if mode is modes.SOFT:
            t = self.tau
            kl = F.kl_div(F.log_softmax(dist_out / t, dim=1), F.log_softmax(teacher_out / t, dim=1),
                          reduction="sum", log_target=True)
            kd = kl * (t * t) / (dist_out.numel() if self.normalization == "official" else dist_out.shape[0])
        elif mode is modes.HARD:
            kd = F.cross_entropy(dist_out, teacher_out.argmax(dim=1))
        else:  # a mode the official code does not have: its own term, at the official normalisation
            kd = mode.kd_term(dist_out, teacher_out, modes.KDParams(self.tau, self.normalization))
        return base * (1 - self.alpha) + kd * self.alpha

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        self.student.train()
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.cuda):
            outputs = self.student(images)
            loss = self.loss(images, outputs, labels)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value}, stopping training")
        self.optimizer.zero_grad(set_to_none=False)
        self.scaler.scale(loss).backward()
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.student.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.cuda:
            torch.cuda.synchronize()
        return value
