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
# The modules that must work without ray and mlflow (torch + timm + pydantic only).
PURE = ("batches", "checkpoints", "data", "distill", "engine", "errors", "gpu_augment", "models", "modes",
        "pretrained", "reference", "run_artifacts", "shards", "spec", "step", "step_bench")
BLOCKER = """
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow"):
            raise ImportError(f"{name} is not importable here (the pure core must not need it)")
sys.meta_path.insert(0, Blocked())
"""


def _internal_imports(path: Path) -> set[str]:
    """The deitlab modules `path` imports anywhere in its body (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import modes
                found.update(alias.name for alias in node.names)
            elif (node.module or "").startswith("deitlab."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("deitlab."))
    return found


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


def test_the_modules_import_each_other_without_a_cycle():
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    graph = {name: _internal_imports(path) & set(modules) for name, path in modules.items()}
    assert _cycles(graph) == []
    # the check itself finds a cycle where there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_imports_and_trains_without_ray_and_mlflow(tmp_path):
    code = BLOCKER + f"""
import importlib
for name in {PURE!r}:
    importlib.import_module("deitlab." + name)
try:
    import ray
except ImportError:
    pass
else:
    raise SystemExit("the blocker let ray through")
from deitlab.engine import main
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
from deitlab.step_bench import main
raise SystemExit(main(["--preset", "tiny", "--steps", "1", "--warmup", "0", "--repeats", "1", "--pack", "2",
                       "--only", "reference,lean,packed", "--json"]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)["results"]
    assert {"reference", "lean", "packed"} <= set(results) and all(r["img_per_s"] > 0 for r in results.values())
