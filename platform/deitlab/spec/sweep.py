"""A sweep spec and its plan: a base experiment, a grid and a sampled space over dotted keys, seeds, teachers by
name; expanded into every trial's validated ExperimentSpec, deterministically.
"""
from __future__ import annotations

import itertools
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from deitlab.core import modes
from deitlab.spec.base import MISSING, StrictSpec, lookup
from deitlab.spec.schema import ExperimentSpec, TeacherSpec, epoch_metric

# ----------------------------------------------------------------------------------------------------------- sweep
TEACHER_KEY = "teacher"


SAMPLE_DIGITS = 4  # sampled values are rounded to 4 significant digits: readable names and params, exact replay


def _round(value: float) -> float:
    return float(f"{value:.{SAMPLE_DIGITS}g}")


class Distribution(StrictSpec):
    """One sampled key of a sweep's `space`: exactly one of choice / uniform / loguniform / randint.

    `when` makes the key conditional: it is only drawn for trials whose values match (a value or a list of values per
    key), e.g. `distillation.tau: {loguniform: [1, 10], when: {distillation.mode: soft}}`.
    """

    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = Field(None, description="integers low..high, both included")
    when: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_distribution(self) -> Distribution:
        given = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, randint"
                             + (f" (got {', '.join(given)})" if given else ""))
        bounds = self.uniform or self.loguniform or self.randint
        if bounds and not bounds[0] < bounds[1] + (self.randint is not None):
            raise ValueError(f"{given[0]}: low must be below high (got {list(bounds)})")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: bounds must be positive (got {list(self.loguniform)})")
        return self

    def matches(self, values: dict[str, Any]) -> bool:
        for key, wanted in self.when.items():
            options = wanted if isinstance(wanted, list) else [wanted]
            if values.get(key) not in options:
                return False
        return True

    def draw(self, rng) -> Any:
        import math

        if self.choice is not None:
            return self.choice[rng.randrange(len(self.choice))]
        if self.randint is not None:
            return rng.randint(*self.randint)
        if self.uniform is not None:
            return _round(rng.uniform(*self.uniform))
        low, high = self.loguniform
        return _round(math.exp(rng.uniform(math.log(low), math.log(high))))


class EarlyStopping(StrictSpec):
    """ASHA: at epochs grace_period × reduction_factor^k, stop trials outside the best 1/reduction_factor."""

    grace_period: int = Field(1, gt=0, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SweepSpec(StrictSpec):
    """A base experiment, a grid over dotted keys and an optional sampled `space`. `teacher` picks from `teachers`.

    Meaningless combinations are collapsed: tau only matters for soft mode; mode none uses no teacher for training
    (the first teacher is kept as the reference that agreement is measured against), no tau and no lambda.
    Sampling (random search) happens here, in the planner, seeded per (search_seed, sample, grid point): every trial
    is known and validated before anything starts, and adding seeds, samples or grid points never changes the
    values already drawn — so `sweep extend` runs only what is new.
    """

    SWEEP_BASE: ClassVar[bool] = True

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=80)
    experiment: ExperimentSpec
    teachers: dict[str, TeacherSpec] = Field(default_factory=dict)
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]] = Field(default_factory=dict)
    space: dict[str, Distribution] = Field(default_factory=dict, description="sampled keys (random search)")
    samples: int = Field(1, gt=0, description="draws of `space` per grid point")
    search_seed: int = 0
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    metric: str = "acc"
    mode: Literal["max", "min"] = "max"
    early_stopping: EarlyStopping | None = None
    max_concurrent_trials: int | None = Field(None, gt=0, alias="max_concurrent")
    pack: int = Field(1, ge=1, le=64, description="train up to this many trials together when they share teacher,"
                                                  " data and batch schedule: one batch and one teacher forward per"
                                                  " step for all (1: every trial alone)")

    @model_validator(mode="before")
    @classmethod
    def _experiment_per_family(cls, raw: Any) -> Any:
        # Each sweep family (a sweep, its resumes and extensions) gets an MLflow experiment named after it, unless
        # the base experiment names one: the UI then compares one family's runs side by side.
        if isinstance(raw, dict) and isinstance(raw.get("experiment"), dict) and isinstance(raw.get("name"), str):
            run = raw["experiment"].get("run") or {}
            if isinstance(run, dict) and "experiment" not in run:
                raw = {**raw, "experiment": {**raw["experiment"], "run": {**run, "experiment": raw["name"]}}}
        return raw

    @field_validator("grid")
    @classmethod
    def _grid_lists(cls, grid):
        for sub in grid if isinstance(grid, list) else [grid]:
            for key, values in sub.items():
                if not values:
                    raise ValueError(f"grid key '{key}' has no values")
        return grid

    _known_metric = field_validator("metric")(epoch_metric)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        return seeds

    @property
    def subgrids(self) -> list[dict[str, list[Any]]]:
        return self.grid if isinstance(self.grid, list) else [self.grid]

    @model_validator(mode="after")
    def _teachers_named(self) -> SweepSpec:
        named = [n for sub in self.subgrids for n in sub.get(TEACHER_KEY, [])]
        if TEACHER_KEY in self.space:
            named += self.space[TEACHER_KEY].choice or [None]
        for name in named:
            if name not in self.teachers:
                known = ", ".join(self.teachers) or "none defined"
                raise ValueError(f"teacher '{name}' is not in 'teachers' ({known})")
        return self

    @model_validator(mode="after")
    def _space_is_consistent(self) -> SweepSpec:
        for key, dist in self.space.items():
            if any(key in sub for sub in self.subgrids):
                raise ValueError(f"space key '{key}' is also in grid; give each key in one of them")
            if key == "run.seed":
                raise ValueError("seeds are given by 'seeds', not sampled")
            if key == TEACHER_KEY and dist.choice is None:
                raise ValueError("space key 'teacher' needs 'choice'")
            for cond in dist.when:
                if cond == key or (cond not in self.space and not any(cond in sub for sub in self.subgrids)
                                   and lookup(self.experiment, cond) is MISSING):
                    raise ValueError(f"space key '{key}': 'when' refers to '{cond}', which is neither a grid or space"
                                     " key nor a field of the experiment")
        return self

    def trial_overrides(self) -> list[dict[str, Any]]:
        """Expanded, sampled, collapsed and de-duplicated trial points, in a stable order; each includes run.seed."""
        points: list[dict[str, Any]] = []
        for sample in range(self.samples if self.space else 1):
            for sub in self.subgrids:
                keys = list(sub)
                for values in itertools.product(*(sub[k] for k in keys)):
                    point = self._collapse(self._sampled(dict(zip(keys, values)), sample))
                    for seed in self.seeds:
                        seeded = {**point, "run.seed": seed}
                        if seeded not in points:
                            points.append(seeded)
        return points

    def _sampled(self, point: dict[str, Any], sample: int) -> dict[str, Any]:
        """Draw the space's keys for one grid point, from an RNG seeded by (search_seed, sample, grid point)."""
        import json
        import random

        if not self.space:
            return point
        rng = random.Random(json.dumps([self.search_seed, sample, point], sort_keys=True, default=str))
        for key, dist in self.space.items():  # in spec order: a `when` may look at keys drawn before it
            value = dist.draw(rng)  # drawn even when unused, so one key's condition never shifts another's draws
            view = {**{k: lookup(self.experiment, k) for k in dist.when}, **point}
            if dist.matches(view):
                point[key] = value
        return point

    def _collapse(self, point: dict[str, Any]) -> dict[str, Any]:
        # describe(): an unknown mode in the grid keeps its keys; its trial spec then says what is wrong
        mode = modes.describe(point.get("distillation.mode", self.experiment.distillation.mode))
        if not mode.uses_tau:
            point.pop("distillation.tau", None)
        if not mode.uses_lambda:
            point.pop("distillation.lambda", None)
        if not mode.needs_teacher and TEACHER_KEY in point:  # the reference teacher for agreement: the first listed
            point[TEACHER_KEY] = next(iter(self.teachers))
        return point

    def trial_spec(self, overrides: dict[str, Any]) -> ExperimentSpec:
        values = dict(overrides)
        teacher = values.pop(TEACHER_KEY, None)
        if teacher is not None:
            values[TEACHER_KEY] = {"name": teacher, **self.teachers[teacher].model_dump(by_alias=True, exclude_unset=True)}
        return self.experiment.with_overrides(values)

    def trial_specs(self) -> list[tuple[dict[str, Any], ExperimentSpec]]:
        return [(o, self.trial_spec(o)) for o in self.trial_overrides()]
