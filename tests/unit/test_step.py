"""The lean step computes what the official DeiT step computes; a packed student computes what it computes alone."""
import copy
import math

import numpy as np
import pytest
import timm
import torch
from deitlab.core.checkpoints import read_checkpoint, write_checkpoint
from deitlab.core.engine import experiment_engine, pack_engine, pack_key
from deitlab.core.models import save_model
from deitlab.core.reference import ReferenceStep
from deitlab.core.step import LossConfig, Student, lean_optimizer, prepare_teacher, teacher_logits
from deitlab.spec.base import validate
from deitlab.spec.schema import ExperimentSpec
from timm.data import Mixup

CPU = torch.device("cpu")


def _models():
    torch.manual_seed(0)
    student = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=16, patch_size=4,
                                embed_dim=32, depth=2, num_heads=2)
    student.set_distilled_training(True)
    teacher = timm.create_model("test_resnet", num_classes=10)
    return student, teacher


@pytest.mark.parametrize("mode, tau, alpha, mixup", [("soft", 3.0, 0.1, True), ("hard", 1.0, 0.5, False),
                                                      ("none", 1.0, 0.0, True)])
def test_lean_step_loss_and_weights_equal_the_official_step_at_fp32(mode, tau, alpha, mixup):
    torch.set_num_threads(2)
    student, teacher = _models()
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10) if mixup else None
    reference = ReferenceStep(copy.deepcopy(student), copy.deepcopy(teacher), mode=mode, alpha=alpha, tau=tau,
                              lr=1e-3, weight_decay=0.05, label_smoothing=0.1, mixup=mix, clip_grad=1.0)
    lean_teacher = prepare_teacher(teacher, CPU, amp=True)
    lean = Student("s", student, LossConfig(mode, alpha, tau, "official", 0.1), device=CPU, amp=True, clip_grad=1.0,
                   optimizer=lean_optimizer(student, "adamw", lr=1e-3, weight_decay=0.05, device=CPU))
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        images, labels = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        np.random.seed(step)
        expected = reference.step(images.clone(), labels)  # timm Mixup mixes in place
        np.random.seed(step)
        mixed, targets = mix(images, labels) if mix else (images, labels)
        lean.step(mixed, targets, teacher_logits(lean_teacher, mixed), step + 1)
        assert math.isclose(lean.last_loss.item(), expected, rel_tol=1e-5, abs_tol=1e-6), step
    assert lean.last_loss.item() > 0
    for (name, a), b in zip(lean.model.named_parameters(), reference.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def _trials(teacher_path) -> dict[str, ExperimentSpec]:
    base = {"student": {"patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 1},
            "teacher": {"checkpoint": str(teacher_path)}, "optim": {"epochs": 3},
            "data": {"dataset": "synthetic", "synthetic_size": 96, "img_size": 8, "batch_size": 16,
                     "augment": {"mixup": 0.8, "cutmix": 1.0, "random_erasing": 0.25, "hflip": True}}}
    overrides = {
        "hard": {"distillation.mode": "hard"},
        "soft-tau4-droppath": {"distillation.mode": "soft", "distillation.tau": 4.0, "student.drop_path_rate": 0.1,
                               "optim.lr": 1e-3},
        "none-notoken": {"distillation.mode": "none", "distillation.token": False, "student.embed_dim": 24},
    }
    spec = validate(ExperimentSpec, base)
    return {name: spec.with_overrides(o) for name, o in overrides.items()}


def _values(history):
    return [{k: v for k, v in m.items() if k not in ("epoch_time_s", "epoch_wall_s", "train_images_per_s")}
            for m in history]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    return save_model(path, timm.create_model("test_resnet", num_classes=10), arch="test_resnet", model_kwargs={},
                      num_classes=10, in_chans=3)


def test_packed_students_equal_the_same_trials_run_alone_and_survive_a_diverged_member(teacher_file, tmp_path):
    torch.set_num_threads(2)
    specs = _trials(teacher_file)
    assert len({pack_key(s) for s in specs.values()}) == 1
    alone = {name: _values(experiment_engine(spec, str(teacher_file), device=CPU).run(3))
             for name, spec in specs.items()}

    pack = pack_engine(specs, str(teacher_file), device=CPU)
    first = next(pack.run_pack(3))
    write_checkpoint(tmp_path, pack.state_dict())  # a pack checkpoint resumes every member where it was
    pack = pack_engine(specs, str(teacher_file), device=CPU)
    pack.load_state_dict(read_checkpoint(tmp_path))
    assert pack.epoch == 1 and sorted(first) == sorted(specs)
    list(pack.run_pack(3))
    for student in pack.students:
        assert len(alone[student.name]) == 3
        for got, want in zip(_values(student.history), alone[student.name]):
            assert got.keys() == want.keys()
            for key in want:
                assert math.isclose(got[key], want[key], rel_tol=1e-6, abs_tol=1e-7), (student.name, key)
    assert alone["hard"][-1]["train_kd_loss"] > 0 and alone["none-notoken"][-1]["train_kd_loss"] == 0

    # A member whose weights turn to NaN is stopped with its reason; the rest of its pack trains on, unchanged.
    pack = pack_engine(specs, str(teacher_file), device=CPU)
    next(pack.run_pack(3))
    broken = pack.students[1]
    with torch.no_grad():
        broken.model.head.weight.fill_(float("nan"))
    list(pack.run_pack(3))
    assert broken.stopped == "training loss is not finite at epoch 2" and len(broken.history) == 1
    for student in (pack.students[0], pack.students[2]):
        assert student.stopped is None and _values(student.history)[-1]["acc"] == alone[student.name][-1]["acc"]

    # A scheduler's stop (ASHA) ends one member; the engine ends when none is left.
    pack = pack_engine(specs, str(teacher_file), device=CPU)
    next(pack.run_pack(3))
    pack.stop("hard", "stopped by the scheduler at epoch 1")
    assert sorted(next(pack.run_pack(3))) == ["none-notoken", "soft-tau4-droppath"]


def test_pack_key_separates_what_cannot_be_shared(teacher_file):
    specs = _trials(teacher_file)
    spec = specs["hard"]
    assert pack_key(spec) == pack_key(spec.with_overrides({"optim.lr": 0.1, "run.tags": {"team": "x"}}))
    for shared in ({"run.seed": 1}, {"data.batch_size": 8}, {"optim.epochs": 4}, {"data.augment.mixup": 0.0},
                   {"teacher.checkpoint": str(teacher_file) + ".other"}, {"init_from": str(teacher_file)}):
        assert pack_key(spec) != pack_key(spec.with_overrides(shared)), shared
    with pytest.raises(ValueError, match="share"):
        pack_engine({"a": spec, "b": spec.with_overrides({"run.seed": 1})}, str(teacher_file), device=CPU)


def test_bench_step_json_runs_on_cpu_in_seconds(tmp_path):
    """`deitlab bench step --json` as the GPU box runs it (python -m, no ray/mlflow needed), tiny sizes on CPU."""
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "deitlab.step_bench", "--preset", "tiny", "--steps", "2", "--warmup", "1",
               "--repeats", "2", "--pack", "3", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["results"]) == {"reference", "lean", "packed", "alone", "cached", "teacher", "student", "data",
                                      "decode"}
    for name, timing in report["results"].items():
        assert len(timing["runs"]) == 2 and timing["min"] <= timing["img_per_s"] <= timing["max"], name
        assert timing["img_per_s"] > 0
    ratios = report["ratios"]
    assert ratios["lean_vs_reference"] == round(report["results"]["lean"]["img_per_s"]
                                                / report["results"]["reference"]["img_per_s"], 3)
    assert ratios["packed_trials_per_hour_vs_alone"] == round(3 * report["results"]["packed"]["img_per_s"]
                                                              / report["results"]["alone"]["img_per_s"], 3)
    assert ratios["cached_trials_per_hour_vs_alone"] == round(3 * report["results"]["cached"]["img_per_s"]
                                                              / report["results"]["alone"]["img_per_s"], 3)
    # r = teacher forward / student step (per image), and the bounds it sets: K(r+1)/(r+K) packed, r+1 cached
    r = report["results"]["student"]["img_per_s"] / report["results"]["teacher"]["img_per_s"]
    assert ratios["teacher_vs_student_step_r"] == round(r, 3)
    assert ratios["packed_bound"] == round(3 * (r + 1) / (r + 3), 3) and ratios["cached_bound"] == round(r + 1, 3)
    assert report["config"]["batch"] == 8 and "data_vs_lean_step" in ratios

    bad = subprocess.run([*command[:3], "--preset", "huge"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --preset 'huge': one of paper, small, teacher_cpu, tiny"
