"""Spec loading, overrides, sweep expansion, and one-line errors for bad input."""
from pathlib import Path

import pytest
from conftest import write_yaml
from deitlab.cli.app import app
from deitlab.errors import SpecError
from deitlab.spec.base import validate
from deitlab.spec.loading import load_experiment, load_sweep, parse_set
from deitlab.spec.schema import ExperimentSpec, RunSpec, TeacherSpec
from typer.testing import CliRunner

TEACHER = "teacher: {arch: test_resnet, checkpoint: t.pt}\n"


def test_defaults_and_overrides(tmp_path):
    spec = load_experiment(write_yaml(tmp_path / "e.yaml", TEACHER + "distillation: {mode: soft}\n"),
                           parse_set(["distillation.tau=4", "optim.epochs=2", "distillation.token=false"]))
    assert spec.distillation.tau == 4.0 and spec.optim.epochs == 2
    assert spec.distillation.weight == 0.1  # the paper's soft λ when none is given
    assert not spec.distillation.uses_token
    assert spec.student.timm_name(True) == "deit_tiny_distilled_patch16_224"
    params = spec.flat_params()
    assert params["distillation.lambda"] == 0.1 and params["teacher"] == "test_resnet"
    assert spec.with_overrides({"distillation.lambda": 0.5}).distillation.weight == 0.5


def test_table3_rows_are_expressible(tmp_path):
    """DeiT Table 3: none; soft/hard on the class token only; token with cls/dist/fused evaluation."""
    base = {"teacher": {"arch": "test_resnet", "checkpoint": "t.pt"}}
    rows = [
        {"distillation": {"mode": "none"}},
        {"distillation": {"mode": "soft", "token": False, "tau": 3, "lambda": 0.1}},
        {"distillation": {"mode": "hard", "token": False}},
        {"distillation": {"mode": "hard", "token": True, "eval_head": "cls"}},
        {"distillation": {"mode": "hard", "token": True, "eval_head": "dist"}},
        {"distillation": {"mode": "hard", "token": True, "eval_head": "fused"}},
    ]
    specs = [validate(ExperimentSpec, {**base, **row}) for row in rows]
    assert [s.distillation.uses_token for s in specs] == [False, False, False, True, True, True]
    assert [s.distillation.weight for s in specs] == [0.0, 0.1, 0.5, 0.5, 0.5, 0.5]


SWEEP = """
name: s
experiment: {optim: {epochs: 1}}
teachers:
  convnet: {uri: "models:/c/1"}
  vit: {uri: "models:/v/1"}
grid:
  distillation.mode: [none, soft, hard]
  distillation.tau: [1, 4]
  distillation.lambda: [0.1, 0.5]
  teacher: [convnet, vit]
"""


def test_sweep_collapses_meaningless_combinations(tmp_path):
    sweep = load_sweep(write_yaml(tmp_path / "s.yaml", SWEEP))
    points = sweep.trial_overrides()
    modes = [p["distillation.mode"] for p in points]
    assert modes.count("none") == 1  # no tau, no lambda, one reference teacher
    assert modes.count("soft") == 8  # 2 tau × 2 lambda × 2 teachers
    assert modes.count("hard") == 4  # tau dropped: 2 lambda × 2 teachers
    assert all("distillation.tau" not in p for p in points if p["distillation.mode"] == "hard")
    specs = dict((sweep.trial_spec(p).teacher.name, p) for p in points if p["distillation.mode"] == "soft")
    assert set(specs) == {"convnet", "vit"}


def test_sweep_seeds_and_subgrids(tmp_path):
    text = SWEEP.split("grid:")[0] + """seeds: [0, 1]
grid:
  - {distillation.mode: [none]}
  - {distillation.mode: [hard], teacher: [vit]}
"""
    points = load_sweep(write_yaml(tmp_path / "s.yaml", text)).trial_overrides()
    assert len(points) == 4 and {p["run.seed"] for p in points} == {0, 1}


def test_bundled_quickstart_sweep_covers_the_issue():
    from importlib import resources

    with resources.as_file(resources.files("deitlab") / "specs" / "quickstart_sweep.yaml") as path:
        points = load_sweep(path).trial_overrides()
    assert len(points) >= 8
    assert {p["distillation.mode"] for p in points} == {"none", "soft", "hard"}
    assert len({p["distillation.tau"] for p in points if "distillation.tau" in p}) >= 2
    assert len({p["distillation.lambda"] for p in points if "distillation.lambda" in p}) >= 2
    assert {p["teacher"] for p in points if p["distillation.mode"] != "none"} == {"convnet", "vit"}

    # Packed: the 8 distilled trials train as two packs, one per teacher (`none` joins its reference teacher's).
    from deitlab.orchestration.packs import plan_packs
    from deitlab.orchestration.sweep import planned_trials

    sweep = load_sweep(path)
    specs = planned_trials(sweep)
    units = plan_packs(specs, sweep.pack)
    assert len(units) == 2 and sorted(m for ms in units.values() for m in ms) == sorted(specs)
    distilled_by = sorted([specs[m].teacher.name for m in ms if specs[m].distillation.mode != "none"]
                          for ms in units.values())
    assert distilled_by == [["convnet"] * 4, ["vit"] * 4]


BAD = {
    "unknown model": ("student: {arch: deit_nonexistent_patch16_224}\ndistillation: {mode: none}\n",
                      "student.arch: unknown timm model"),
    "tau <= 0": (TEACHER + "distillation: {mode: soft, tau: 0}\n", "distillation.tau"),
    "lambda > 1": (TEACHER + "distillation: {mode: soft, lambda: 1.5}\n", "distillation.lambda"),
    "lambda < 0": (TEACHER + "distillation: {mode: hard, lambda: -0.1}\n", "distillation.lambda"),
    "unknown mode": (TEACHER + "distillation: {mode: medium}\n", "distillation.mode"),
    "missing teacher": ("distillation: {mode: hard}\n", "needs a 'teacher' section"),
    "malformed yaml": ("distillation: {mode: hard\n", "malformed YAML"),
    "unknown field": ("distillation: {mode: none, temprature: 3}\n", "distillation.temprature: unknown field"),
    "unknown teacher arch": ("teacher: {arch: resnet9000, checkpoint: t.pt}\n", "teacher.arch: unknown timm model"),
    "two teacher sources": ("teacher: {checkpoint: t.pt, uri: 'models:/t/1'}\n", "exactly one of"),
    "bad uri": ("teacher: {uri: 'http://x/y'}\n", "not an MLflow model URI"),
    "patch does not tile": ("student: {patch_size: 5}\ndistillation: {mode: none}\n", "multiple of its patch"),
    "not a mapping": ("- a\n- b\n", "expected a mapping"),
    "empty": ("", "the spec is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_specs_fail_with_one_line(tmp_path, case):
    text, needle = BAD[case]
    path = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(SpecError) as info:
        load_experiment(path)
    assert needle in str(info.value)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("case", ["tau <= 0", "missing teacher", "malformed yaml", "unknown mode"])
def test_cli_bad_spec_exit_2_one_line_no_traceback(tmp_path, case):
    path = write_yaml(tmp_path / "bad.yaml", BAD[case][0])
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and BAD[case][1] in lines[0]
    assert "Traceback" not in result.output


def test_bad_sweep_grid_value_fails_before_anything_starts(tmp_path):
    path = write_yaml(tmp_path / "s.yaml", SWEEP.replace("[1, 4]", "[1, -4]"))
    with pytest.raises(SpecError, match="grid: distillation.tau"):
        load_sweep(path)
    path = write_yaml(tmp_path / "s2.yaml", SWEEP.replace("teacher: [convnet, vit]", "teacher: [convnet, rn]"))
    with pytest.raises(SpecError, match="teacher 'rn' is not in 'teachers'"):
        load_sweep(path)


@pytest.mark.parametrize("args,needle", [
    (["train", "does-not-exist.yaml"], "no such spec file"),
    (["train", "{spec}", "--set", "nonsense"], "expected KEY=VALUE"),
    (["report", "x", "--format", "xml"], "--format 'xml'"),
    (["report", "nosweep", "--workdir", "{tmp}"], "no MLflow store"),
    (["check", "{spec}", "--kind", "nothing"], "--kind 'nothing'"),
])
def test_cli_bad_options_exit_2(tmp_path, args, needle):
    spec = write_yaml(tmp_path / "ok.yaml", "distillation: {mode: none}\n")
    args = [a.format(spec=spec, tmp=tmp_path) for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_cli_check_prints_sweep_plan(tmp_path):
    result = CliRunner().invoke(app, ["sweep", "plan", str(write_yaml(tmp_path / "s.yaml", SWEEP))])
    assert result.exit_code == 0, result.output
    assert "13 trials" in result.output and "none-s0" in result.output


def test_every_shipped_experiment_spec_validates():
    from deitlab.spec.loading import load_teacher_training, read_yaml

    root = Path(__file__).resolve().parents[2] / "experiments"
    paths = sorted(root.glob("*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        raw = read_yaml(path)
        if "grid" in raw:
            assert load_sweep(path).trial_overrides()
        elif "arch" in raw:
            load_teacher_training(path)
        else:
            load_experiment(path)


def test_local_paths_become_absolute_where_the_spec_is_loaded(tmp_path, monkeypatch):
    """Ray workers and Tune trials run in other directories: a relative path must not change meaning there."""
    monkeypatch.chdir(tmp_path)
    run = validate(RunSpec, {"workdir": "work", "storage": "file://store"})
    assert run.workdir == str(tmp_path / "work") and run.storage == str(tmp_path / "store")
    assert validate(RunSpec, {}).workdir == str(tmp_path / "deitlab-work")
    s3 = "s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http"
    assert validate(RunSpec, {"storage": s3}).storage == s3
    teacher = validate(TeacherSpec, {"checkpoint": "t.pt"})
    assert teacher.checkpoint == str(tmp_path / "t.pt")


def test_sweep_plan_shows_each_trials_pack_and_full_names_on_a_narrow_terminal(tmp_path, monkeypatch):
    from deitlab.cli.app import out
    from deitlab.orchestration.packs import plan_packs
    from deitlab.orchestration.sweep import planned_trials

    monkeypatch.setattr(out, "width", 70)  # narrower than the table wants: other columns give way
    path = write_yaml(tmp_path / "s.yaml", SWEEP + "pack: 4\n")
    result = CliRunner().invoke(app, ["sweep", "plan", str(path)])
    assert result.exit_code == 0, result.output
    units = plan_packs(planned_trials(load_sweep(path)), 4)
    lines = result.output.splitlines()
    for unit, members in units.items():
        for member in members:
            [line] = [ln for ln in lines if f" {member} " in ln]  # the whole name, on one line
            assert (unit if len(members) > 1 else "—") in line, line
    assert "pack-" in result.output

    unpacked = CliRunner().invoke(app, ["sweep", "plan", str(write_yaml(tmp_path / "u.yaml", SWEEP))])
    assert "pack-" not in unpacked.output and "none-s0" in unpacked.output


def test_params_leave_out_what_the_mode_does_not_use(tmp_path):
    """MLflow searches and charts count what is logged: a hard run has no τ, a run without distillation no λ,
    token or teacher (its agreement teacher is reference_teacher), a student without the token no fusion."""
    base = load_experiment(write_yaml(tmp_path / "e.yaml", TEACHER))
    soft = base.with_overrides({"distillation.mode": "soft", "distillation.tau": 4.0}).flat_params()
    assert soft["distillation.tau"] == 4.0 and soft["distillation.lambda"] == 0.1
    assert soft["teacher"] == "test_resnet" and soft["teacher.arch"] == "test_resnet"
    assert soft["distillation.fusion"] == "logits" and soft["distillation.soft_normalization"] == "batchmean"
    hard = base.with_overrides({"distillation.mode": "hard", "distillation.token": False}).flat_params()
    assert "distillation.tau" not in hard and "distillation.soft_normalization" not in hard
    assert "distillation.fusion" not in hard and "distillation.eval_head" not in hard
    assert hard["distillation.lambda"] == 0.5 and hard["distillation.token"] is False
    none = base.with_overrides({"distillation.mode": "none"}).flat_params()
    assert not {"distillation.tau", "distillation.lambda", "distillation.token", "teacher"} & set(none)
    assert not [k for k in none if k.startswith("teacher.")]
    assert none["reference_teacher"] == "test_resnet" and none["reference_teacher.arch"] == "test_resnet"
    assert none["student.timm_name"] == hard["student.timm_name"]  # no token: the same student
