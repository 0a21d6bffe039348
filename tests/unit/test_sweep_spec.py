"""Sweep search spaces: sampling, conditions, stable draws when a sweep grows, one-line errors; presets; init_from."""
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_yaml
from deitlab.cli.app import app
from deitlab.errors import SpecError
from deitlab.orchestration.sweep import planned_trials, trial_name
from deitlab.spec.loading import load_sweep
from typer.testing import CliRunner

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
BASE = {"name": "space", "experiment": {"student": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}},
        "teachers": {"convnet": {"arch": "test_resnet", "checkpoint": "t.pt"}}}


def _sweep(tmp_path, **fields):
    return load_sweep(write_yaml(tmp_path / "s.yaml", json.dumps({**BASE, **fields})))


def test_space_is_sampled_with_conditions_and_bounds(tmp_path):
    sweep = _sweep(tmp_path, grid={"distillation.mode": ["none", "soft", "hard"], "teacher": ["convnet"]},
                   space={"distillation.tau": {"loguniform": [1, 10], "when": {"distillation.mode": "soft"}},
                          "distillation.lambda": {"uniform": [0.1, 0.9]},
                          "optim.lr": {"choice": [0.001, 0.002]},
                          "optim.epochs": {"randint": [2, 4]}},
                   samples=4, seeds=[0, 1])
    points = sweep.trial_overrides()
    assert len(points) == 3 * 4 * 2 and len({trial_name(p) for p in points}) == len(points)
    for p in points:
        mode = p["distillation.mode"]
        assert ("distillation.tau" in p) == (mode == "soft")  # conditional: soft only
        assert ("distillation.lambda" in p) == (mode != "none")  # lambda means nothing without a teacher
        if mode == "soft":
            assert 1 <= p["distillation.tau"] <= 10
        if mode != "none":
            assert 0.1 <= p["distillation.lambda"] <= 0.9
            assert p["distillation.lambda"] == float(f"{p['distillation.lambda']:.4g}")  # 4 significant digits
        assert p["optim.lr"] in (0.001, 0.002) and 2 <= p["optim.epochs"] <= 4
    taus = [math.log(p["distillation.tau"]) for p in points if "distillation.tau" in p]
    assert len(set(taus)) == 4  # one draw per sample, shared by the seeds of that sample
    specs = planned_trials(sweep)  # every trial validates into a full experiment spec
    assert all(s.optim.epochs in (2, 3, 4) for s in specs.values())


def test_growing_a_sweep_never_changes_values_already_drawn(tmp_path):
    fields = dict(grid={"distillation.mode": ["soft"], "teacher": ["convnet"]},
                  space={"distillation.tau": {"loguniform": [1, 10]}, "distillation.lambda": {"uniform": [0, 1]}})
    small = {trial_name(p) for p in _sweep(tmp_path, samples=3, seeds=[0], **fields).trial_overrides()}
    grown = {trial_name(p) for p in _sweep(tmp_path, samples=5, seeds=[0, 1], **fields).trial_overrides()}
    assert small < grown and len(grown) == 10
    again = {trial_name(p) for p in _sweep(tmp_path, samples=3, seeds=[0], **fields).trial_overrides()}
    assert again == small  # reproducible
    other = {trial_name(p) for p in _sweep(tmp_path, samples=3, seeds=[0], search_seed=1, **fields).trial_overrides()}
    assert other.isdisjoint(small)


BAD_SPACES = {
    "two distributions": ({"distillation.tau": {"uniform": [1, 2], "choice": [1]}}, "exactly one of"),
    "no distribution": ({"distillation.tau": {}}, "exactly one of"),
    "low above high": ({"distillation.tau": {"uniform": [5, 1]}}, "low must be below high"),
    "log of zero": ({"distillation.tau": {"loguniform": [0, 1]}}, "bounds must be positive"),
    "unknown when": ({"distillation.tau": {"uniform": [1, 2], "when": {"distilation.mode": "soft"}}},
                     "'when' refers to 'distilation.mode'"),
    "key in grid too": ({"distillation.mode": {"choice": ["soft"]}}, "also in grid"),
    "unknown teacher": ({"teacher": {"choice": ["convnet", "rn"]}}, "teacher 'rn' is not in 'teachers'"),
    "bad value": ({"distillation.tau": {"uniform": [-2, -1]}}, "distillation.tau"),
    "unknown field": ({"distillation.temprature": {"uniform": [1, 2]}}, "temprature"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_invalid_spaces_fail_in_one_line_before_anything_runs(tmp_path, case):
    space, needle = BAD_SPACES[case]
    path = write_yaml(tmp_path / "bad.yaml", json.dumps({**BASE, "grid": {"distillation.mode": ["soft"],
                                                                             "teacher": ["convnet"]},
                                                         "space": space}))
    result = CliRunner().invoke(app, ["sweep", "submit", str(path), "--address", "http://127.0.0.1:9", "--no-wait"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.output


def test_other_sweep_fields_are_checked(tmp_path):
    for fields, needle in [({"metric": "accuracy"}, "unknown metric 'accuracy'"), ({"seeds": [0, 0]}, "seeds repeat"),
                           ({"name": "a b"}, "name"), ({"early_stopping": {"reduction_factor": 1}}, "greater than 1"),
                           ({"mode": "up"}, "mode")]:
        with pytest.raises(SpecError, match=needle):
            _sweep(tmp_path, **fields)


@pytest.mark.parametrize("preset,trials", [("deit_table3.yaml", 4), ("teacher_comparison.yaml", 5),
                                           ("tau_lambda.yaml", 16), ("transfer.yaml", 2)])
def test_presets_validate_and_scale_by_one_set(preset, trials):
    sweep = load_sweep(EXPERIMENTS / preset)
    assert len(sweep.trial_overrides()) == trials * len(sweep.seeds)
    five = load_sweep(EXPERIMENTS / preset, {"seeds": [0, 1, 2, 3, 4]})
    assert len(five.trial_overrides()) == trials * 5


def test_init_student_resamples_position_embedding_and_keeps_new_heads_fresh():
    from deitlab.core.models import build_student, init_student
    from deitlab.spec.schema import DistillationSpec, StudentSpec

    student = StudentSpec(patch_size=4, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    small = build_student(student, DistillationSpec(mode="hard"), 10, 1, 16)  # 4×4 patches + cls + dist
    torch.manual_seed(1)
    large = build_student(student, DistillationSpec(mode="none"), 5, 1, 32)  # 8×8 patches + cls, 5 classes
    fresh_head = large.head.weight.clone()
    kept = init_student(large, small.state_dict())
    assert large.pos_embed.shape == (1, 1 + 64, 32)
    assert torch.equal(large.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
    assert torch.equal(large.pos_embed[:, :1], small.pos_embed[:, :1])  # class token slot kept, dist slot dropped
    # a constant positional embedding stays constant when resampled: check the interpolation on one
    const = {k: v.clone() for k, v in small.state_dict().items()}
    const["pos_embed"][:, 2:] = 0.25
    init_student(large, const)
    assert torch.allclose(large.pos_embed[:, 1:], torch.full_like(large.pos_embed[:, 1:], 0.25), atol=1e-5)
    assert "head.weight" in kept and "head_dist.weight" in kept and torch.equal(large.head.weight, fresh_head)


def test_each_sweep_family_gets_its_own_mlflow_experiment_unless_one_is_named(tmp_path):
    plain = load_sweep(write_yaml(tmp_path / "a.yaml", "name: fam-a\nexperiment: {distillation: {mode: none}}\n"))
    named = load_sweep(write_yaml(tmp_path / "b.yaml", "name: fam-b\nexperiment: {distillation: {mode: none},"
                                                       " run: {experiment: shared}}\n"))
    assert plain.experiment.run.experiment == "fam-a"
    assert named.experiment.run.experiment == "shared"
    assert {s.run.experiment for s in planned_trials(plain).values()} == {"fam-a"}


def test_trial_names_read_switches_as_words_and_old_sweeps_keep_theirs(tmp_path):
    sweep = _sweep(tmp_path, grid={"distillation.mode": ["none", "hard"], "teacher": ["convnet"],
                                   "distillation.token": [True, False]}, seeds=[0])
    assert sorted(planned_trials(sweep)) == ["hard-convnet-notoken-s0", "hard-convnet-token-s0",
                                             "none-notoken-s0", "none-token-s0"]
    # a sweep recorded before (its parent has no deitlab.trial_names tag) is resumed under the names it ran with
    assert sorted(planned_trials(sweep, "1")) == ["hard-convnet-tokenFalse-s0", "hard-convnet-tokenTrue-s0",
                                                  "none-tokenFalse-s0", "none-tokenTrue-s0"]
