"""The layering, enforced: deitlab's modules import each other without a cycle (function-local imports included), and
the pure core — models, modes and losses, data, the step and the engine — plus the spec import and run with ray and
mlflow made unimportable, as on a GPU box that has neither."""
import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import deitlab

PACKAGE = Path(deitlab.__file__).parent
# The layers that must work without ray and mlflow (torch + timm + pydantic only), and what each layer may import.
PURE = ("core", "data", "spec", "bench")
MAY_IMPORT = {
    "core": {"core", "data", "spec"}, "data": {"data", "core"},
    "spec": {"spec", "core", "data"},  # the mode registry; validators that parse augmentation and pack settings
    "tracking": {"tracking"}, "report": {"report", "tracking", "core"},
    "orchestration": {"orchestration", "core", "data", "spec", "tracking"},
    "bench": {"bench", "core", "data", "spec", "tracking", "orchestration"},
    "cli": {"cli", "orchestration", "core", "data", "spec", "tracking", "report", "bench"},
}
BLOCKER = """
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow"):
            raise ImportError(f"{name} is not importable here (the pure core must not need it)")
sys.meta_path.insert(0, Blocked())
"""


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _internal_imports(path: Path) -> set[str]:
    """The deitlab modules `path` imports anywhere in its body (module level or inside functions), as dotted names
    relative to the package (`core.engine`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deitlab"):
            base = node.module.removeprefix("deitlab").lstrip(".")
            for alias in node.names:  # `from deitlab.core import modes` imports the module core.modes
                full = f"{base}.{alias.name}" if base else alias.name
                found.add(full if (PACKAGE / (full.replace(".", "/") + ".py")).is_file() else base)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; deitlab's modules import each other by absolute name")
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("deitlab.") for a in node.names if a.name.startswith("deitlab."))
    return {name for name in found if name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (or a module importing itself)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"}
    return {name: {m for m in _internal_imports(path) if m in modules} - {name} for name, path in modules.items()}


def test_the_modules_import_each_other_without_a_cycle():
    assert _cycles(_graph()) == []
    # the check itself finds a cycle where there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for module, imported in _graph().items():
        layer = module.split(".")[0]
        if layer not in MAY_IMPORT:
            continue  # errors, the entry-point shims
        wrong += [f"{module} -> {other}" for other in sorted(imported)
                  if other.split(".")[0] in MAY_IMPORT and other.split(".")[0] not in MAY_IMPORT[layer]]
    assert wrong == []


def test_the_core_imports_and_trains_without_ray_and_mlflow(tmp_path):
    modules = sorted(m for m in _graph() if m.split(".")[0] in PURE)
    code = BLOCKER + f"""
import importlib
for name in {modules!r}:
    importlib.import_module("deitlab." + name)
try:
    import ray
except ImportError:
    pass
else:
    raise SystemExit("the blocker let ray through")
from deitlab.core.engine import main
raise SystemExit(main(["{tmp_path / 'exp.yaml'}"]))
"""
    (tmp_path / "exp.yaml").write_text(
        "name: pure\nstudent: {patch_size: 4, embed_dim: 16, depth: 1, num_heads: 1}\n"
        "distillation: {mode: none}\noptim: {epochs: 1, warmup_epochs: 0}\n"
        "data: {dataset: synthetic, synthetic_size: 64, img_size: 8, batch_size: 16}\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["epoch"] == 1 and 0.0 <= last["acc"] <= 1.0 and math.isfinite(last["train_loss"])


def test_the_step_bench_runs_without_ray_and_mlflow():
    code = BLOCKER + """
from deitlab.bench.step import main
raise SystemExit(main(["--preset", "tiny", "--steps", "1", "--warmup", "0", "--repeats", "1", "--pack", "2",
                       "--only", "reference,lean,packed", "--json"]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)["results"]
    assert {"reference", "lean", "packed"} <= set(results) and all(r["img_per_s"] > 0 for r in results.values())
