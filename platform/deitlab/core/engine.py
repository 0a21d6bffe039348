"""The framework-free train/eval loop: torch + timm only. Ray Train, a bare GPU box and the tests all drive this.

`Engine` owns the loaders, batch pipeline, frozen teacher and one or more students (step.Student: model, optimiser,
schedule) for one rank. With several students (a pack) every batch is augmented once and the teacher runs once for
all of them — or not at all, when the teacher-logit cache (teacher_cache.py) holds its logits for the pass. When
torch.distributed is initialised with more than one rank (Ray Train, torchrun) each student is wrapped in DDP and
evaluation counts are summed across ranks; nothing else changes.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from timm.scheduler import create_scheduler_v2
from torch import nn

from deitlab.core.checkpoints import Storage
from deitlab.core.distill import (
    accuracies_from_counts,
    confusion_counts,
    ground_truth_loss,
    head_agreement_counts,
    head_predictions,
)
from deitlab.core.models import (
    build_classifier,
    build_student,
    build_teacher,
    init_student,
    student_heads,
    student_weights,
)
from deitlab.core.step import (
    DIVERGED_REASON,
    LossConfig,
    Student,
    autocast,
    lean_optimizer,
    prepare_teacher,
    train_step,
)
from deitlab.core.teacher_cache import CacheStats, TeacherCache, TeacherFeed, cache_key, weights_sha256
from deitlab.data.loaders import BatchPipeline, DataBundle, data_fingerprint, load_data, make_loaders
from deitlab.errors import SpecError
from deitlab.spec.loading import load_experiment, parse_set


@dataclass
class Member:
    """One student as an Engine receives it: its name (the trial's), fresh model and its own settings."""
    name: str
    model: nn.Module
    loss: LossConfig
    optim: Any  # spec.OptimSpec: opt, lr (+ scaling), weight decay, schedule, clipping
    eval_head: str = "fused"
    fusion: str = "logits"  # how the fused head joins the two: mean of logits (official DeiT) or of softmaxes


def pick_device(run) -> torch.device:
    """CUDA when the run asks for GPUs and has one (this rank's, under torchrun/Ray), else CPU with bounded threads."""
    if run.gpus_per_worker > 0 and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    torch.set_num_threads(run.torch_threads)
    return torch.device("cpu")


class Engine:
    """Trains one student, or a pack of students in lockstep on the same batches and the same teacher forward."""

    def __init__(self, members: list[Member], *, teacher: nn.Module | None, data, run, device: torch.device,
                 rank: int = 0, world_size: int = 1, bundle: DataBundle | None = None,
                 teacher_cache: TeacherCache | None = None):
        if len({m.name for m in members}) != len(members) or not members:
            raise ValueError("an engine needs one or more students with distinct names")
        self.device, self.rank, self.world_size = device, rank, world_size
        self.bundle = bundle or load_data(data)
        loader_bundle = self.bundle
        if device.type == "cuda" and self.bundle.in_memory:  # small in-memory sets live on the GPU: no transfers
            loader_bundle = replace(self.bundle, train=tuple(t.to(device) for t in self.bundle.train),
                                    val=tuple(t.to(device) for t in self.bundle.val))
        self.train_loader, self.val_loader = make_loaders(loader_bundle, data, rank=rank, world_size=world_size,
                                                          seed=run.seed)
        self.pipeline = BatchPipeline(self.bundle, data.augment, device)
        self.amp = run.amp and device.type == "cuda"
        compile_ = getattr(run, "compile", False)
        self.teacher = prepare_teacher(teacher, device, amp=self.amp, compile=compile_) if teacher is not None else None
        self.teacher_cache = teacher_cache if self.teacher is not None else None
        self.teacher_stats = CacheStats()  # this run's teacher batches: cached, written, live (kept in checkpoints)
        self._distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
        self.global_batch = data.batch_size * world_size
        self.seed = run.seed
        self.students = [self._student(m, run, compile_) for m in members]
        self.epoch = 0  # epochs completed
        self.log_every_steps = getattr(run, "log_every_steps", 0)

    def _student(self, member: Member, run, compile_: bool) -> Student:
        model = member.model.to(self.device)
        trainable = model
        if self._distributed:
            trainable = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        optim = member.optim
        lr = optim.scaled_lr(self.global_batch)
        optimizer = lean_optimizer(model, optim.opt, lr=lr, weight_decay=optim.weight_decay, device=self.device)
        scheduler = None
        if optim.sched != "none":
            scheduler, _ = create_scheduler_v2(
                optimizer, optim.sched, num_epochs=optim.epochs, warmup_epochs=optim.warmup_epochs,
                min_lr=optim.min_lr, warmup_lr=lr * 0.01, step_on_epochs=False,
                updates_per_epoch=len(self.train_loader))
        return Student(member.name, model, member.loss, optimizer, scheduler, device=self.device, amp=self.amp,
                       clip_grad=optim.clip_grad, seed=run.seed, eval_head=member.eval_head, trainable=trainable,
                       compile=compile_, fusion=member.fusion)

    # ------------------------------------------------------------------------------------- the single student
    @property
    def student(self) -> Student:
        """The student of a one-student engine (what `deitlab train` and teachers use)."""
        if len(self.students) != 1:
            raise ValueError(f"this engine trains a pack of {len(self.students)} students")
        return self.students[0]

    model = property(lambda self: self.student.model)
    optimizer = property(lambda self: self.student.optimizer)
    history = property(lambda self: self.student.history)
    confusion = property(lambda self: self.student.confusion)

    @property
    def on_step(self):
        return self.student.on_step

    @on_step.setter
    def on_step(self, hook) -> None:
        self.student.on_step = hook

    def active(self) -> list[Student]:
        return [s for s in self.students if s.stopped is None]

    def stop(self, name: str, reason: str) -> None:
        """Stop training one student (a scheduler's decision); the rest of the pack goes on."""
        next(s for s in self.students if s.name == name).stopped = reason

    def _seed_epoch(self) -> int:
        """Reseed every RNG that augmentation draws from, from (seed, rank, epoch); returns the seed.

        Checkpoints fall on epoch boundaries, so a resumed run draws exactly the random numbers an uninterrupted one
        would have, with no generator state to save (and a run resumed on another number of workers is well defined).
        Students draw dropout and drop-path from their own streams (step.Student.own_rng), seeded from this too.
        """
        seed = (self.seed * 1_000_003 + self.rank * 10_007 + self.epoch) % 2**31
        torch.manual_seed(seed)  # CPU and every CUDA device
        np.random.seed(seed)  # timm Mixup
        random.seed(seed)  # timm RandomErasing
        return seed

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        if len(self.students) == 1:  # the format single runs always had
            state = self.student.state_dict(self.epoch)
        else:
            state = {"epoch": self.epoch, "students": {s.name: s.state_dict(self.epoch) for s in self.students}}
        return {**state, "teacher_batches": self.teacher_stats.as_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.teacher_stats = CacheStats(**state.get("teacher_batches", {}))
        if "students" in state:
            for student in self.students:
                student.load_state_dict(state["students"][student.name], self.epoch)
        else:
            self.student.load_state_dict(state, self.epoch)

    # ---------------------------------------------------------------------------------------------- epochs
    def _teacher_feed(self, split: str, epoch: int | None, steps: int) -> TeacherFeed | None:
        """Where this pass's teacher logits come from (the cache or the teacher); None without a teacher."""
        if self.teacher is None:
            return None
        return TeacherFeed(self.teacher, self.teacher_cache, split, epoch, steps, self.teacher_stats)

    def train_epoch(self) -> dict[str, dict[str, float]]:
        """One epoch of every active student; their training metrics by name. A student whose loss is not finite
        is stopped (its reason says so) and left out; the others go on."""
        active = self.active()
        self.train_loader.set_epoch(self.epoch)
        seed = self._seed_epoch()
        for student in active:
            student.begin_epoch((seed + 7_919) % 2**31)
        per_epoch = len(self.train_loader)
        steps, images_seen, start = 0, 0, time.perf_counter()
        needs_teacher = any(s.loss.needs_teacher for s in active)
        feed = self._teacher_feed("train", self.epoch, per_epoch) if needs_teacher else None
        for images, labels in self.train_loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            images, targets = self.pipeline.train_batch(images, labels)
            steps += 1
            global_step = self.epoch * per_epoch + steps
            train_step(active, self.teacher, images, targets, global_step, feed(images) if feed else None)
            images_seen += images.shape[0]
            if self.log_every_steps and global_step % self.log_every_steps == 0:
                for student in active:
                    if student.on_step is not None:
                        student.on_step(student.step_metrics(), global_step)
        if feed is not None:
            feed.finish()
        self.epoch += 1
        elapsed = time.perf_counter() - start
        sums = torch.stack([s.sums for s in active])  # one reduction for the whole pack
        if self._distributed:  # every rank has the same number of steps: the mean of rank means is the global mean
            dist.all_reduce(sums)
            sums /= self.world_size
        finite = torch.isfinite(sums).all(dim=1).tolist()
        results = {}
        for student, (loss, base, kd), ok in zip(active, (sums / max(steps, 1)).tolist(), finite):
            if not ok:
                student.stopped = f"{DIVERGED_REASON} at epoch {self.epoch}"
                continue
            results[student.name] = {
                "train_loss": loss, "train_base_loss": base, "train_kd_loss": kd,
                "lr": student.optimizer.param_groups[0]["lr"], "epoch_time_s": elapsed,
                "train_images_per_s": images_seen * self.world_size / max(elapsed, 1e-9)}
        return results

    @torch.no_grad()
    def evaluate(self) -> dict[str, dict[str, float]]:
        """Per active student: accuracies of the class head, distillation head, fused heads and teacher, agreement
        with the teacher, validation loss. The teacher runs once per batch for the whole pack."""
        active = self.active()
        classes = self.bundle.num_classes
        totals: dict[str, dict[str, torch.Tensor]] = {s.name: {} for s in active}
        confusion = {s.name: torch.zeros(classes, classes, dtype=torch.long, device=self.device) for s in active}
        loss_sum = {s.name: torch.zeros((), device=self.device) for s in active}
        for student in active:
            student.model.eval()
        feed = self._teacher_feed("val", None, len(self.val_loader))
        for images, labels in self.val_loader:
            images = self.pipeline.normalize(images.to(self.device, non_blocking=True))
            labels = labels.to(self.device, non_blocking=True)
            t_logits = feed(images) if feed is not None else None
            for student in active:
                with autocast(self.amp, self.device):
                    cls_logits, dist_logits = student_heads(student.model, images)
                loss_sum[student.name] += ground_truth_loss(cls_logits, labels) * labels.numel()
                predictions = head_predictions(cls_logits, dist_logits, student.fusion)
                confusion[student.name] += confusion_counts(labels, predictions[student.eval_head], classes)
                mine = totals[student.name]
                for key, value in head_agreement_counts(cls_logits, dist_logits, labels, t_logits,
                                                        predictions).items():
                    mine[key] = mine.get(key, 0) + value.float()
        if feed is not None:
            feed.finish()
        results = {}
        for student in active:
            keys = sorted(totals[student.name])
            packed = torch.stack([totals[student.name][k] for k in keys] + [loss_sum[student.name]])
            matrix = confusion[student.name]
            if self._distributed:
                dist.all_reduce(packed)
                dist.all_reduce(matrix)
            student.confusion = matrix.tolist()
            counts = dict(zip(keys, packed.tolist()))
            metrics = accuracies_from_counts(counts)
            metrics["val_loss"] = packed[-1].item() / max(counts["count"], 1.0)
            metrics["acc"] = metrics[f"acc_{student.eval_head}"]
            results[student.name] = metrics
        return results

    def run_pack(self, epochs: int) -> Iterator[dict[str, dict[str, float]]]:
        """Train up to `epochs` total (resuming after self.epoch); per epoch, each active student's train + val
        metrics by name. Ends early when every student has stopped."""
        mark = time.perf_counter()
        while self.epoch < epochs and self.active():
            results = self.train_epoch()
            evaluations = self.evaluate()
            # Wall time since the previous epoch ended: training, evaluation, and whatever the caller did with the
            # previous epoch (checkpointing, reporting): what `deitlab bench overhead` compares.
            now = time.perf_counter()
            wall, mark = now - mark, now
            for student in self.active():
                metrics = results[student.name]
                metrics.update(evaluations[student.name])
                metrics["epoch"] = self.epoch
                metrics["epoch_wall_s"] = wall
                metrics["best_acc"] = max([m["acc"] for m in student.history] + [metrics["acc"]])
                student.history.append(dict(metrics))
            yield results

    def run(self, epochs: int) -> Iterator[dict[str, float]]:
        """The one student's metrics per epoch; FloatingPointError when its loss stops being finite."""
        student = self.student
        for results in self.run_pack(epochs):
            if student.stopped is not None:
                raise FloatingPointError(student.stopped)
            yield results[student.name]


# ------------------------------------------------------------------------------------------------- from specs
# Per-trial fields a pack member may have of its own; everything else in the spec is shared by the pack.
OWN_OPTIM_FIELDS = ("lr", "weight_decay", "opt", "sched", "warmup_epochs", "min_lr", "clip_grad", "lr_base_batch")


def pack_key(spec) -> str:
    """Trials with equal keys can share batches and teacher forwards: the same teacher, data, augmentation, batch
    schedule (seed, epochs, workers), initial weights and run settings. The student (any size), its distillation
    settings (mode, token, τ, λ), optimiser settings and tags are each member's own."""
    shared = spec.model_dump(mode="json", exclude={"student": True, "distillation": True,
                                                   "optim": set(OWN_OPTIM_FIELDS), "run": {"tags"}})
    return json.dumps(shared, sort_keys=True)


def pack_engine(specs: dict[str, Any], teacher_file: str | None, *, device: torch.device, rank: int = 0,
                world_size: int = 1, init_file: str | None = None, cache_storage: str | None = None) -> Engine:
    """An Engine training one student per ExperimentSpec in `specs` (name → spec) in lockstep; the specs must share
    a pack_key. `teacher_file` and `init_file` (the students' starting weights, from spec.init_from) are local files:
    adapters resolve runs:/ and models:/ URIs. `cache_storage`: where the teacher-logit cache lives (the spec's
    run.cache_storage, as the commands pass it); None: no cache."""
    first = next(iter(specs.values()))
    if len({pack_key(spec) for spec in specs.values()}) != 1:
        raise ValueError("packed trials must share teacher, data, batch schedule and run settings")
    bundle = load_data(first.data)
    teacher = cache = None
    if first.teacher is not None:
        teacher, _ = build_teacher(first.teacher, teacher_file, bundle)
        if cache_storage is not None and first.run.teacher_cache.enabled:
            cache = open_teacher_cache(first, teacher, bundle, cache_storage, device=device, rank=rank,
                                       world_size=world_size)
    if first.init_from and init_file is None:
        if ":/" in first.init_from:
            raise ValueError("the spec has init_from but no checkpoint file was resolved")
        init_file = first.init_from
    members = []
    for name, spec in specs.items():
        torch.manual_seed(spec.run.seed)  # identical initial weights on every rank, and packed or alone
        student = build_student(spec.student, spec.distillation, bundle.num_classes, bundle.in_chans, bundle.img_size)
        if init_file:
            init_student(student, student_weights(init_file))
        members.append(Member(name, student, LossConfig.from_specs(spec.distillation, spec.data.augment), spec.optim,
                              spec.distillation.eval_head, spec.distillation.fusion))
    return Engine(members, teacher=teacher, data=first.data, run=first.run, device=device, rank=rank,
                  world_size=world_size, bundle=bundle, teacher_cache=cache)


def open_teacher_cache(spec, teacher: nn.Module, bundle: DataBundle, storage_uri: str, *, device: torch.device,
                       rank: int, world_size: int) -> TeacherCache:
    """The teacher-logit cache of a spec's batches, under `storage_uri`, with the spec's run.teacher_cache settings."""
    settings = spec.run.teacher_cache
    key = cache_key(spec, weights_sha=weights_sha256(teacher), fingerprint=data_fingerprint(bundle),
                    num_classes=bundle.num_classes, world_size=world_size, device_type=device.type)
    storage = Storage.open(storage_uri, create=False, what="run.teacher_cache.storage")
    return TeacherCache(storage, key, rank=rank, num_classes=bundle.num_classes, verify=settings.verify)


def experiment_engine(spec, teacher_file: str | None, *, device: torch.device, rank: int = 0,
                      world_size: int = 1, init_file: str | None = None, cache_storage: str | None = None) -> Engine:
    """An Engine for one ExperimentSpec (see pack_engine)."""
    return pack_engine({"student": spec}, teacher_file, device=device, rank=rank, world_size=world_size,
                       init_file=init_file, cache_storage=cache_storage)


def teacher_engine(spec, *, device: torch.device, rank: int = 0, world_size: int = 1, name: str = "teacher") -> Engine:
    """An Engine that trains a plain classifier (a future teacher) on ground truth."""
    bundle = load_data(spec.data)
    torch.manual_seed(spec.run.seed)
    model = build_classifier(spec.arch, spec.model_kwargs, bundle.num_classes, bundle.in_chans,
                             pretrained=spec.pretrained)
    loss = LossConfig(mode="none", label_smoothing=spec.data.augment.label_smoothing)
    return Engine([Member(name, model, loss, spec.optim, eval_head="cls")], teacher=None, data=spec.data,
                  run=spec.run, device=device, rank=rank, world_size=world_size, bundle=bundle)


@torch.no_grad()
def classifier_accuracy(model: nn.Module, bundle: DataBundle, data, device: torch.device) -> float:
    """Top-1 accuracy of a frozen classifier on the bundle's validation split, fed as a teacher is fed (the batch
    pipeline's normalisation; wrap the model in pretrained.TeacherInput for another convention)."""
    _, val = make_loaders(bundle, data)
    pipeline = BatchPipeline(bundle, data.augment, device)
    model = model.to(device).eval()
    correct = total = 0
    for images, labels in val:
        images = pipeline.normalize(images.to(device))
        correct += int((model(images).argmax(-1) == labels.to(device)).sum())
        total += labels.numel()
    return correct / max(total, 1)


def main(argv: list[str] | None = None) -> int:
    """`python -m deitlab.engine SPEC`: one experiment on this machine, no Ray, no MLflow (bare GPU boxes)."""
    import argparse
    import json

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
        engine = experiment_engine(spec, spec.teacher.checkpoint if spec.teacher else None, device=pick_device(spec.run),
                                   cache_storage=spec.run.cache_storage)
        for metrics in engine.run(spec.optim.epochs):
            print(json.dumps({k: round(v, 5) for k, v in metrics.items()}), flush=True)
    except SpecError as err:
        print(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
