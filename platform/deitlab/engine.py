"""The framework-free train/eval loop: torch + timm only. Ray Train, a bare GPU box and the tests all drive this.

`Engine` owns the model, optimiser, schedule, loaders and batch pipeline for one rank. When torch.distributed is
initialised with more than one rank (Ray Train, torchrun) the trainable model is wrapped in DDP and evaluation counts
are summed across ranks; nothing else changes.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from .data import BatchPipeline, DataBundle, load_data, make_loaders
from .distill import (accuracies_from_counts, confusion_counts, distillation_loss, ground_truth_loss,
                      head_agreement_counts, head_predictions)
from .models import student_heads


@dataclass(frozen=True)
class LossConfig:
    mode: str = "none"
    weight: float = 0.0
    tau: float = 1.0
    normalization: str = "batchmean"
    label_smoothing: float = 0.1
    hard_label_smoothing: float = 0.0

    @classmethod
    def from_specs(cls, distillation, augment) -> LossConfig:
        return cls(distillation.mode, distillation.weight, distillation.tau, distillation.soft_normalization,
                   augment.label_smoothing, distillation.hard_label_smoothing)


def pick_device(run) -> torch.device:
    """CUDA when the run asks for GPUs and has one (this rank's, under torchrun/Ray), else CPU with bounded threads."""
    if run.gpus_per_worker > 0 and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    torch.set_num_threads(run.torch_threads)
    return torch.device("cpu")


class Engine:
    def __init__(self, model: nn.Module, *, teacher: nn.Module | None, loss: LossConfig, data, optim, run,
                 device: torch.device, rank: int = 0, world_size: int = 1, bundle: DataBundle | None = None,
                 eval_head: str = "fused"):
        self.loss_config, self.optim, self.device, self.eval_head = loss, optim, device, eval_head
        self.rank, self.world_size = rank, world_size
        self.bundle = bundle or load_data(data)
        self.train_loader, self.val_loader = make_loaders(self.bundle, data, rank=rank, world_size=world_size,
                                                          seed=run.seed)
        self.pipeline = BatchPipeline(self.bundle, data.augment, device)
        self.model = model.to(device)
        self.teacher = teacher.to(device) if teacher is not None else None
        if self.teacher is not None and device.type == "cuda":
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.trainable = self.model
        self._distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
        if self._distributed:
            self.trainable = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.global_batch = data.batch_size * world_size
        self.lr = optim.scaled_lr(self.global_batch)
        self.optimizer = create_optimizer_v2(self.model, optim.opt, lr=self.lr, weight_decay=optim.weight_decay)
        self.scheduler = None
        if optim.sched != "none":
            self.scheduler, _ = create_scheduler_v2(
                self.optimizer, optim.sched, num_epochs=optim.epochs, warmup_epochs=optim.warmup_epochs,
                min_lr=optim.min_lr, warmup_lr=self.lr * 0.01, step_on_epochs=False,
                updates_per_epoch=len(self.train_loader))
        self.amp = run.amp and device.type == "cuda"
        self.seed = run.seed
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, float]] = []  # every completed epoch's metrics, kept in checkpoints
        self.confusion: list[list[int]] | None = None  # the last evaluation's confusion matrix (eval head)
        # Called every `log_every_steps` optimiser steps with ({"train_loss_step", "lr_step"}, global step): the one
        # host sync of the step happens only then. Adapters point it at their metric logger's log().
        self.on_step = None
        self.log_every_steps = getattr(run, "log_every_steps", 0)

    def _seed_epoch(self) -> None:
        """Reseed every RNG that augmentation and dropout draw from, from (seed, rank, epoch).

        Checkpoints fall on epoch boundaries, so a resumed run draws exactly the random numbers an uninterrupted one
        would have, with no generator state to save (and a run resumed on another number of workers is well defined).
        """
        seed = (self.seed * 1_000_003 + self.rank * 10_007 + self.epoch) % 2**31
        torch.manual_seed(seed)  # CPU and every CUDA device
        np.random.seed(seed)  # timm Mixup
        random.seed(seed)  # timm RandomErasing

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else {}, "epoch": self.epoch,
                "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.history = list(state.get("history", []))[: self.epoch]

    # ---------------------------------------------------------------------------------------------- steps
    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def _teacher_logits(self, images: torch.Tensor) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        with torch.inference_mode(), self._autocast():
            logits = self.teacher(images).float()
        return logits.clone()  # a normal tensor again: the loss saves it for backward, inference tensors can't be

    def train_epoch(self) -> dict[str, float]:
        self.trainable.train()
        self.train_loader.set_epoch(self.epoch)
        self._seed_epoch()
        c = self.loss_config
        teacher = self.teacher if c.mode != "none" else None
        sums = torch.zeros(3, device=self.device)  # loss, base, kd
        steps, images_seen, start = 0, 0, time.perf_counter()
        for images, labels in self.train_loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            images, targets = self.pipeline.train_batch(images, labels)
            teacher_logits = self._teacher_logits(images) if teacher is not None else None
            with self._autocast():
                outputs = self.trainable(images)
            parts = distillation_loss(outputs, targets, teacher_logits, mode=c.mode, weight=c.weight, tau=c.tau,
                                      normalization=c.normalization, label_smoothing=c.label_smoothing,
                                      hard_label_smoothing=c.hard_label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            parts.loss.backward()
            if self.optim.clip_grad:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.clip_grad)
            self.optimizer.step()
            steps += 1
            images_seen += images.shape[0]
            if self.scheduler is not None:
                self.scheduler.step_update(self.epoch * len(self.train_loader) + steps)
            sums += torch.stack([parts.loss.detach(), parts.base, parts.kd])
            global_step = self.epoch * len(self.train_loader) + steps
            if self.on_step is not None and self.log_every_steps and global_step % self.log_every_steps == 0:
                self.on_step({"train_loss_step": parts.loss.item(), "lr_step": self.optimizer.param_groups[0]["lr"]},
                             global_step)
        self.epoch += 1
        elapsed = time.perf_counter() - start
        if self._distributed:  # every rank has the same number of steps: the mean of rank means is the global mean
            dist.all_reduce(sums)
            sums /= self.world_size
        loss, base, kd = (sums / max(steps, 1)).tolist()
        if not torch.isfinite(sums).all():
            raise FloatingPointError(f"training loss is not finite at epoch {self.epoch}")
        return {"train_loss": loss, "train_base_loss": base, "train_kd_loss": kd,
                "lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": elapsed,
                "train_images_per_s": images_seen * self.world_size / max(elapsed, 1e-9)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Accuracies of the class head, distillation head, fused heads and teacher, and agreement with the teacher."""
        self.model.eval()
        totals: dict[str, torch.Tensor] = {}
        classes = self.bundle.num_classes
        confusion = torch.zeros(classes, classes, dtype=torch.long, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        for images, labels in self.val_loader:
            images = self.pipeline.normalize(images.to(self.device, non_blocking=True))
            labels = labels.to(self.device, non_blocking=True)
            with self._autocast():
                cls_logits, dist_logits = student_heads(self.model, images)
            teacher_logits = self._teacher_logits(images)
            loss_sum += ground_truth_loss(cls_logits, labels) * labels.numel()
            predictions = head_predictions(cls_logits, dist_logits)
            confusion += confusion_counts(labels, predictions[self.eval_head], classes)
            for key, value in head_agreement_counts(cls_logits, dist_logits, labels, teacher_logits,
                                                    predictions).items():
                totals[key] = totals.get(key, 0) + value.float()
        keys = sorted(totals)
        packed = torch.stack([totals[k] for k in keys] + [loss_sum])
        if self._distributed:
            dist.all_reduce(packed)
            dist.all_reduce(confusion)
        self.confusion = confusion.tolist()
        counts = dict(zip(keys, packed.tolist()))
        metrics = accuracies_from_counts(counts)
        metrics["val_loss"] = packed[-1].item() / max(counts["count"], 1.0)
        metrics["acc"] = metrics[f"acc_{self.eval_head}"]
        return metrics

    def run(self, epochs: int) -> Iterator[dict[str, float]]:
        """Train up to `epochs` total (resuming after self.epoch), yielding each epoch's train + val metrics."""
        mark = time.perf_counter()
        while self.epoch < epochs:
            metrics = self.train_epoch()
            metrics.update(self.evaluate())
            metrics["epoch"] = self.epoch
            # Wall time since the previous epoch ended: training, evaluation, and whatever the caller did with the
            # previous epoch (checkpointing, reporting): what `deitlab bench overhead` compares.
            now = time.perf_counter()
            metrics["epoch_wall_s"], mark = now - mark, now
            metrics["best_acc"] = max([m["acc"] for m in self.history] + [metrics["acc"]])
            self.history.append(dict(metrics))
            yield metrics


# ------------------------------------------------------------------------------------------------- from specs
def experiment_engine(spec, teacher_file: str | None, *, device: torch.device, rank: int = 0,
                      world_size: int = 1, init_file: str | None = None) -> Engine:
    """An Engine for one ExperimentSpec. `teacher_file` and `init_file` (the student's starting weights, from
    spec.init_from) are local files: adapters resolve runs:/ and models:/ URIs."""
    from .models import build_student, init_student, load_teacher, student_weights

    bundle = load_data(spec.data)
    teacher = None
    if spec.teacher is not None:
        if teacher_file is None:
            raise ValueError("the spec has a teacher but no teacher file was resolved")
        teacher, _ = load_teacher(teacher_file, num_classes=bundle.num_classes, in_chans=bundle.in_chans,
                                  arch=spec.teacher.arch, model_kwargs=spec.teacher.model_kwargs)
    torch.manual_seed(spec.run.seed)  # identical initial weights on every rank
    student = build_student(spec.student, spec.distillation, bundle.num_classes, bundle.in_chans, bundle.img_size)
    if spec.init_from and init_file is None:
        if ":/" in spec.init_from:
            raise ValueError("the spec has init_from but no checkpoint file was resolved")
        init_file = spec.init_from
    if init_file:
        init_student(student, student_weights(init_file))
    return Engine(student, teacher=teacher, loss=LossConfig.from_specs(spec.distillation, spec.data.augment),
                  data=spec.data, optim=spec.optim, run=spec.run, device=device, rank=rank, world_size=world_size,
                  bundle=bundle, eval_head=spec.distillation.eval_head)


def teacher_engine(spec, *, device: torch.device, rank: int = 0, world_size: int = 1) -> Engine:
    """An Engine that trains a plain classifier (a future teacher) on ground truth."""
    from .models import build_classifier

    bundle = load_data(spec.data)
    torch.manual_seed(spec.run.seed)
    model = build_classifier(spec.arch, spec.model_kwargs, bundle.num_classes, bundle.in_chans)
    loss = LossConfig(mode="none", label_smoothing=spec.data.augment.label_smoothing)
    return Engine(model, teacher=None, loss=loss, data=spec.data, optim=spec.optim, run=spec.run, device=device,
                  rank=rank, world_size=world_size, bundle=bundle, eval_head="cls")


def main(argv: list[str] | None = None) -> int:
    """`python -m deitlab.engine SPEC`: one experiment on this machine, no Ray, no MLflow (bare GPU boxes)."""
    import argparse
    import json

    from .errors import SpecError
    from .spec import load_experiment, parse_set

    parser = argparse.ArgumentParser(prog="python -m deitlab.engine", description=main.__doc__)
    parser.add_argument("spec")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        spec = load_experiment(args.spec, parse_set(args.set))
        if spec.teacher is not None and spec.teacher.checkpoint is None:
            raise SpecError("teacher.uri needs MLflow: use `deitlab train`, or give teacher.checkpoint here")
        if spec.init_from and ":/" in spec.init_from:
            raise SpecError("init_from runs:/ and models:/ need MLflow: use `deitlab train`, or give a checkpoint path")
        engine = experiment_engine(spec, spec.teacher.checkpoint if spec.teacher else None, device=pick_device(spec.run))
        for metrics in engine.run(spec.optim.epochs):
            print(json.dumps({k: round(v, 5) for k, v in metrics.items()}), flush=True)
    except SpecError as err:
        print(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
