"""What every spec shares: strict frozen models, one-line validation errors, dotted keys (`distillation.tau`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from deitlab.errors import SpecError


class StrictSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)
    SWEEP_BASE: ClassVar[bool] = False  # True: its `experiment` is a base that may leave the teacher to the grid


def absolute_path(path: str | None) -> str | None:
    """Local paths are made absolute where the spec is loaded: Ray workers and Tune trials run in other directories."""
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


MISSING = object()


def lookup(spec: BaseModel, key: str) -> Any:
    """The value of a dotted key in a spec (`distillation.mode`), or MISSING."""
    node: Any = spec.model_dump(by_alias=True)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


# ----------------------------------------------------------------------------------------------- loading and errors
def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set tree[a][b][c] = value for key 'a.b.c'; a dict key that itself contains dots (grid keys) matches whole."""
    node = tree
    parts = key.split(".")
    while parts:
        rest = ".".join(parts)
        if rest in node or len(parts) == 1:
            node[rest] = value
            return
        head = parts.pop(0)
        child = node.get(head)
        if child is None:
            child = node[head] = {}
        if not isinstance(child, dict):
            raise SpecError(f"--set {key}: '{head}' is a value, not a section")
        node = child


def first_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "tagged-union")))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "required field is missing"
    if "input" in err and err["type"] not in ("extra_forbidden", "missing", "value_error", "model_type"):
        shown = repr(err["input"])
        msg += f" (got {shown if len(shown) < 60 else shown[:57] + '...'})"
    return f"{loc}: {msg}" if loc else msg


def validate(model: type[StrictSpec], raw: Any, source: str = "spec"):
    """Validate `raw` into `model`, turning pydantic's report into one SpecError line."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return model.model_validate(raw, context={"sweep_base": model.SWEEP_BASE})
    except ValidationError as err:
        problems = "; ".join(_describe(e) for e in err.errors())
        raise SpecError(f"{source}: {problems}") from None
