"""The ImageNet presets at their real shapes, on CPU, with nothing downloaded: the paper's architectures (DeiT-S with
the token, RegNetY-16GF, DeiT-B) with random weights, 224-px 1000-class synthetic data in place of the pack, two
optimiser steps of each distinct trial setting through the engine (with RegNetY-16GF; the DeiT-B teacher is only built). What this cannot check: accuracy, speed, the
parquet decode path (tests/unit/test_shards.py has it at small sizes) and the teacher import (the integration tests)."""
from pathlib import Path

import pytest
import torch
from deitlab.core.engine import Engine, Member
from deitlab.core.models import build_classifier, build_student
from deitlab.core.step import LossConfig
from deitlab.spec.loading import load_experiment, load_sweep

PRESETS = Path(__file__).resolve().parents[2] / "experiments"
TINY_DATA = {"data.dataset": "synthetic", "data.path": None, "data.synthetic_classes": 1000, "data.synthetic_size": 8,
             "data.batch_size": 4, "data.val_fraction": 0.2}
TEACHER_ARCH = {"regnety-16gf": "regnety_160", "deit-base": "deit_base_patch16_224"}


def test_the_experiment_preset_is_the_papers_recipe():
    spec = load_experiment(PRESETS / "deit_imagenet.yaml")
    data, aug, optim = spec.data, spec.data.augment, spec.optim
    assert (spec.student.arch, spec.student.drop_path_rate) == ("deit_small_patch16_224", 0.1)
    assert (spec.distillation.mode, spec.distillation.token, spec.distillation.fusion) == ("hard", True, "logits")
    assert (data.dataset, data.img_size, data.repeated_aug) == ("parquet", 224, 3)
    assert (aug.mixup, aug.cutmix, aug.label_smoothing, aug.random_erasing) == (0.8, 1.0, 0.1, 0.25)
    assert aug.auto_augment == "rand-m9-mstd0.5-inc1" and aug.hflip
    assert (optim.epochs, optim.opt, optim.sched, optim.warmup_epochs, optim.weight_decay) == (300, "adamw", "cosine",
                                                                                               5, 0.05)
    global_batch = data.batch_size * spec.run.workers
    assert optim.scaled_lr(global_batch) == pytest.approx(5e-4 * global_batch / 512)


def _two_steps(spec, teacher_arch: str | None) -> None:
    torch.manual_seed(0)
    student = build_student(spec.student, spec.distillation, 1000, 3, 224)
    teacher = build_classifier(teacher_arch, {}, 1000, 3).eval() if teacher_arch else None
    engine = Engine([Member("s", student, LossConfig.from_specs(spec.distillation, spec.data.augment), spec.optim,
                            spec.distillation.eval_head, spec.distillation.fusion)],
                    teacher=teacher, data=spec.data, run=spec.run, device=torch.device("cpu"))
    assert engine.bundle.img_size == 224 and engine.bundle.num_classes == 1000
    before = [p.detach().clone() for p in student.parameters()]
    [metrics] = engine.train_epoch().values()
    assert len(engine.train_loader) == 2  # two steps of 4 images
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # it trained


@pytest.mark.parametrize("preset", ["deit_imagenet_teachers.yaml", "deit_imagenet_table3.yaml"])
def test_sweep_presets_train_at_real_shapes(preset):
    sweep = load_sweep(PRESETS / preset, {f"experiment.{k}": v for k, v in TINY_DATA.items()})
    seen = set()
    for overrides, spec in sweep.trial_specs():
        assert spec.data.img_size == 224 and spec.optim.epochs == 300 and spec.data.repeated_aug == 3
        teacher = TEACHER_ARCH[overrides["teacher"]] if spec.distillation.mode != "none" else None
        setting = (spec.distillation.mode, spec.distillation.uses_token, teacher)
        if setting in seen:
            continue
        seen.add(setting)
        if teacher in (None, "regnety_160"):  # each distinct student/teacher shape once
            _two_steps(spec, teacher)
        else:  # another teacher: built at its real shape (training with it on CPU costs minutes)
            assert build_classifier(teacher, {}, 1000, 3).num_classes == 1000
    assert len(seen) >= 3
