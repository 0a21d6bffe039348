"""Specs from YAML files and --set overrides, each mistake one line naming the file, the key and what to do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from deitlab.errors import SpecError
from deitlab.spec.base import StrictSpec, first_line, set_dotted, validate
from deitlab.spec.schema import ExperimentSpec, TeacherTrainingSpec
from deitlab.spec.sweep import SweepSpec


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """Parse `key=value` strings; values are YAML scalars or lists (`tau=3`, `grid.teacher=[a,b]`, `token=false`)."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set '{item}': expected KEY=VALUE, e.g. distillation.tau=3")
        try:
            overrides[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise SpecError(f"--set '{item}': value is not valid YAML ({_yaml_problem(err)})") from None
    return overrides


def _yaml_problem(err: yaml.YAMLError) -> str:
    """Where and what, as a user reads it: `line 3, column 5: found character '\\t' …` (PyYAML's own text also
    names the "<unicode string>" it parsed and draws a caret on further lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or not problem:
        return first_line(err)
    context = getattr(err, "context", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f" ({context})" if context else "")


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise SpecError(f"{path}: a folder, not a spec file")
    if not p.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: malformed YAML at {_yaml_problem(err)}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file") from None
    if raw is None:
        raise SpecError(f"{path}: the spec is empty")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw


# Top-level keys only one kind of spec has: a spec of another kind given to a command names the right command.
_KIND_KEYS = {"sweep": ("grid", "teachers", "space", "seeds", "experiment"), "teacher": ("arch",),
              "experiment": ("student", "teacher", "distillation", "init_from")}


_COMMANDS = {"sweep": "deitlab sweep run", "teacher": "deitlab teacher train", "experiment": "deitlab train"}


def _wrong_kind(model: type[StrictSpec], raw: dict[str, Any], path: str | Path) -> None:
    """A sweep given to `train` (or any kind to the wrong command) says so, instead of listing unknown fields."""
    wanted = {ExperimentSpec: "experiment", SweepSpec: "sweep", TeacherTrainingSpec: "teacher"}.get(model)
    article = {"experiment": "an", "sweep": "a", "teacher": "a"}
    for kind, keys in _KIND_KEYS.items():
        found = [k for k in keys if k in raw]
        if kind != wanted and found and not (model is SweepSpec and "experiment" in raw):
            raise SpecError(f"{path}: {article[kind]} {kind} spec (it has '{found[0]}'), not {article[wanted]}"
                            f" {wanted} spec; use `{_COMMANDS[kind]}` (or `deitlab check --kind {kind}`)")


def load(model: type[StrictSpec], path: str | Path, overrides: dict[str, Any] | None = None):
    raw = read_yaml(path)
    _wrong_kind(model, raw, path)
    if model is SweepSpec and isinstance(raw.get("experiment"), str):  # a sweep may point at an experiment file
        raw["experiment"] = read_yaml(Path(path).parent / raw["experiment"])
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return validate(model, raw, source=str(path))


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentSpec:
    return load(ExperimentSpec, path, overrides)


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    sweep = load(SweepSpec, path, overrides)
    try:
        sweep.trial_specs()  # every grid point must validate before anything starts
    except SpecError as err:
        raise SpecError(f"{path}: grid: {str(err).removeprefix('override: ')}") from None
    return sweep


def load_teacher_training(path: str | Path, overrides: dict[str, Any] | None = None) -> TeacherTrainingSpec:
    return load(TeacherTrainingSpec, path, overrides)
