"""The framework-free loop learns on real digits and reports every metric; it resumes from its own state."""
import torch

from deitlab.engine import Engine, LossConfig, experiment_engine, teacher_engine
from deitlab.models import save_model
from deitlab.spec import ExperimentSpec, OptimSpec, RunSpec, TeacherTrainingSpec, validate

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


def test_resume_continues_from_saved_state():
    spec = validate(ExperimentSpec, {"student": {"patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 1},
                                     "distillation": {"mode": "none"}, "optim": {"epochs": 2},
                                     "data": {"dataset": "synthetic", "synthetic_size": 64, "img_size": 8}})
    first = experiment_engine(spec, None, device=CPU)
    list(first.run(1))
    state = first.state_dict()
    second = experiment_engine(spec, None, device=CPU)
    second.load_state_dict(state)
    assert second.epoch == 1
    assert [m["epoch"] for m in second.run(2)] == [2]
    assert torch.equal(next(iter(state["model"].values())), next(iter(first.model.state_dict().values())))
