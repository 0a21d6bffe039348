"""The framework-free loop learns on real digits and reports every metric; it resumes from its own state."""
import pytest
import torch
from deitlab.core.checkpoints import read_checkpoint, write_checkpoint
from deitlab.core.engine import experiment_engine, teacher_engine
from deitlab.core.models import save_model
from deitlab.spec.base import validate
from deitlab.spec.schema import ExperimentSpec, OptimSpec, RunSpec, TeacherTrainingSpec

CPU = torch.device("cpu")


def test_teacher_learns_digits_then_distils_a_student(tmp_path):
    torch.set_num_threads(2)
    spec = TeacherTrainingSpec(name="t", arch="test_resnet", optim=OptimSpec(epochs=3), run=RunSpec(seed=0))
    engine = teacher_engine(spec, device=CPU)
    history = list(engine.run(spec.optim.epochs))
    assert history[-1]["acc"] > 0.85  # chance is 0.10
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    path = save_model(tmp_path / "teacher.pt", engine.model, arch="test_resnet", model_kwargs={}, num_classes=10,
                      in_chans=1)

    student = validate(ExperimentSpec, {
        "student": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
        "teacher": {"checkpoint": str(path)}, "distillation": {"mode": "hard"}, "optim": {"epochs": 5}})
    engine = experiment_engine(student, str(path), device=CPU)
    epochs = list(engine.run(5))
    metrics = epochs[-1]
    for key in ("acc_cls", "acc_dist", "acc_fused", "acc_teacher", "agreement", "train_kd_loss"):
        assert key in metrics
    assert metrics["acc_teacher"] == history[-1]["acc"]  # the same frozen teacher on the same images
    assert metrics["train_kd_loss"] > 0 and metrics["train_kd_loss"] < epochs[0]["train_kd_loss"]
    assert metrics["acc_fused"] > 0.25  # chance is 0.10; a 2-block ViT is a slow starter


TIMING = {"epoch_time_s", "epoch_wall_s", "train_images_per_s"}
AUGMENTED = {"student": {"patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 1, "drop_path_rate": 0.1},
             "distillation": {"mode": "none"}, "optim": {"epochs": 3},
             "data": {"dataset": "synthetic", "synthetic_size": 96, "img_size": 8, "batch_size": 16,
                      "augment": {"mixup": 0.8, "cutmix": 1.0, "random_erasing": 0.25, "hflip": True}}}


def _values(history):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in history]


def test_same_spec_and_seed_give_the_same_metrics_and_another_seed_does_not():
    spec = validate(ExperimentSpec, AUGMENTED)
    first = _values(experiment_engine(spec, None, device=CPU).run(3))
    again = _values(experiment_engine(spec, None, device=CPU).run(3))
    assert first == again
    other = _values(experiment_engine(spec.with_overrides({"run.seed": 1}), None, device=CPU).run(3))
    assert [m["train_loss"] for m in other] != [m["train_loss"] for m in first]


@pytest.mark.parametrize("repeated_aug", [1, 3])
def test_resume_from_a_checkpoint_continues_bit_for_bit(tmp_path, repeated_aug):
    """Mixup, cutmix, erasing, flips, drop-path, repeated augmentation: every RNG the loop draws from is where it
    would have been."""
    spec = validate(ExperimentSpec, {**AUGMENTED, "data": {**AUGMENTED["data"], "repeated_aug": repeated_aug}})
    straight = experiment_engine(spec, None, device=CPU)
    expected = _values(straight.run(3))

    interrupted = experiment_engine(spec, None, device=CPU)
    list(interrupted.run(1))
    write_checkpoint(tmp_path, interrupted.state_dict())
    torch.manual_seed(12345)  # whatever happened in between must not matter
    resumed = experiment_engine(spec, None, device=CPU)
    resumed.load_state_dict(read_checkpoint(tmp_path))
    assert resumed.epoch == 1 and _values(resumed.history) == expected[:1]
    assert _values(resumed.run(3)) == expected[1:]
    assert _values(resumed.history) == expected
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_lr_is_scaled_linearly_with_the_global_batch():
    spec = validate(ExperimentSpec, {**AUGMENTED, "optim": {"lr": 5e-4, "lr_base_batch": 512, "sched": "none"}})
    assert spec.optim.scaled_lr(16 * 2) == 5e-4 * 32 / 512
    assert validate(ExperimentSpec, {**AUGMENTED, "optim": {"lr": 1e-3}}).optim.scaled_lr(32) == 1e-3
    engine = experiment_engine(spec, None, device=CPU)
    assert engine.global_batch == 16 and engine.optimizer.param_groups[0]["lr"] == 5e-4 * 16 / 512


def test_step_hook_sees_every_nth_global_step_and_the_confusion_matrix_counts_the_validation_set():
    spec = validate(ExperimentSpec, {**AUGMENTED, "run": {"log_every_steps": 4}})
    engine = experiment_engine(spec, None, device=CPU)
    seen = []
    engine.on_step = lambda metrics, step: seen.append((step, sorted(metrics)))
    list(engine.run(2))
    steps_per_epoch = len(engine.train_loader)  # 80 training images at batch 16: 5 steps
    assert [s for s, _ in seen] == list(range(4, 2 * steps_per_epoch + 1, 4))
    assert all(keys == ["lr_step", "train_loss_step"] for _, keys in seen)
    matrix = torch.tensor(engine.confusion)
    assert matrix.sum().item() == engine.bundle.sizes[1]
    assert matrix.diagonal().sum().item() / matrix.sum().item() == engine.history[-1]["acc_fused"]
