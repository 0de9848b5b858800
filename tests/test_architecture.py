"""The package's shape, read from its source with `ast`: no import cycles, every module imports only
its own layer or lower ones, and no function grows past 60 lines without a reason on record."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "seg_mlops"

# Lower layers know nothing of higher ones; a module may import its own layer (no cycles) or below.
LAYERS = (
    ("errors",),  # the exception type and its message helpers
    ("config",),  # the typed config: every other module reads it
    ("legacy", "loading", "data", "model", "losses", "augment", "synthetic", "tiling",
     "epoch_clock", "paired", "pair_cache", "dataset_profile", "model_writer"),  # one concept each
    ("infer", "resume", "tiled_dataset", "evaluate", "train", "callbacks"),  # one model, one job
    ("serving", "batch", "tracking", "spool", "lifecycle", "servers", "registry", "tuning",
     "run_page", "crossval", "compare", "planning"),  # MLflow, Optuna, their servers, planning
    ("cli",),
)
LAYER = {module: level for level, modules in enumerate(LAYERS) for module in modules}

MAX_LINES = 60  # a function's body, docstring excluded
# "module.function" -> why it reads better whole. Keep it short: split a function instead.
LONG_FUNCTIONS: dict[str, str] = {}


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path))
            for path in sorted(PACKAGE.glob("*.py")) if path.stem != "__init__"}


def _imports(tree: ast.Module) -> set[str]:
    """seg_mlops modules this one imports anywhere, lazy imports inside functions included."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "seg_mlops" and len(parts) > 1 and (PACKAGE / f"{parts[1]}.py").is_file():
                found.add(parts[1])
    return found


def _graph() -> dict[str, set[str]]:
    return {name: _imports(tree) - {name} for name, tree in _modules().items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per cycle found by depth-first search."""
    cycles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return cycles


def _length(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the def to the end, less the docstring's."""
    lines = fn.end_lineno - fn.lineno + 1
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def _long_functions() -> dict[str, int]:
    """{"module.function": lines} of every function (methods as Class.method) over MAX_LINES."""
    found = {}
    for module, tree in _modules().items():
        def walk(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if _length(child) > MAX_LINES:
                        found[f"{prefix}{child.name}"] = _length(child)
                    walk(child, f"{prefix}{child.name}.")
                elif isinstance(child, ast.ClassDef):
                    walk(child, f"{prefix}{child.name}.")
        walk(tree, f"{module}.")
    return found


def test_every_module_has_a_layer():
    assert set(_modules()) - set(LAYER) == set(), "add the new module to LAYERS"


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_module_imports_a_higher_layer():
    upward = sorted(f"{module} (layer {LAYER[module]}) imports {other} (layer {LAYER[other]})"
                    for module, imported in _graph().items() for other in imported
                    if LAYER.get(other, 0) > LAYER.get(module, 0))
    assert upward == []


def test_long_functions_are_on_record():
    long = _long_functions()
    assert sorted(set(long) - set(LONG_FUNCTIONS)) == [], f"split them, or record why they are better whole: {long}"
    assert sorted(set(LONG_FUNCTIONS) - set(long)) == [], "no longer long: remove them from LONG_FUNCTIONS"


def test_the_checks_see_lazy_imports_and_cycles():
    tree = ast.parse("def f():\n    from seg_mlops import config\n    import seg_mlops.model\n")
    assert _imports(tree) == {"config", "model"}
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b", "a"]]
