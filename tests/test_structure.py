"""The code's shape, checked statically: one-way layering between packages, no import cycle, no
library module importing an entry script, no function over 60 lines, every flag documented."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

# bottom to top; a module may import its own layer or lower ones only
LAYERS = {"common": 0, "custom_datasets": 1, "models": 2, "conversion": 3, "serving": 3, "visualization": 3, "training": 4,
          "engine_pretrain": 5, "engine_finetune": 5, "main_pretrain_cook": 5, "main_finetune": 5, "util": 5,
          "experiments": 6}
ROOT_FILES = {"engine_pretrain", "engine_finetune", "main_pretrain_cook", "main_finetune"}
ENTRY_SCRIPTS = {"main_pretrain_cook", "main_finetune", "util", "experiments"}


def project_modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        package = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if package not in LAYERS:
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports anywhere (module level or inside functions)."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # imports only for type checkers are not dependencies
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            # `from package import submodule` depends on the submodule; any other name on the package
            names = submodules + ([node.module] if len(submodules) < len(node.names) else [])
        found |= {n for n in names if n in modules}
    return found


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.fixture(scope="module")
def graph():
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_layering_is_one_way(graph):
    bad = [f"{m} -> {d}" for m, deps in graph.items() for d in deps if LAYERS[top(d)] > LAYERS[top(m)]]
    assert not bad, "a module imports a higher layer: " + ", ".join(sorted(bad))


def test_no_library_module_imports_an_entry_script(graph):
    bad = [f"{m} -> {d}" for m, deps in graph.items() if top(m) not in ENTRY_SCRIPTS
           for d in deps if top(d) in ENTRY_SCRIPTS]
    assert not bad, ", ".join(sorted(bad))


def test_no_library_module_imports_a_root_file(graph):
    """The flow goes one way, entry script -> engine -> training core: nothing in a package imports
    the files at the root (the engines there only re-export training's, where MAE's users look)."""
    libraries = {name for name, layer in LAYERS.items() if layer <= LAYERS["training"]}
    back = sorted(f"{m} -> {d}" for m, deps in graph.items() if top(m) in libraries for d in deps if d in ROOT_FILES)
    assert not back, back


def test_no_product_module_imports_the_experiments(graph):
    """The experiments and benchmarks (experiments/) measure the product; the product, the user
    tools in util/ included, runs without them."""
    back = sorted(f"{m} -> {d}" for m, deps in graph.items() if top(m) != "experiments" for d in deps
                  if top(d) == "experiments")
    assert not back, back


def test_no_import_cycle(graph):
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_no_function_over_60_lines():
    long = []
    for path in project_modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.endswith("parser"):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({length} lines)")
    assert not long, ", ".join(long)


@pytest.mark.parametrize("script", ["main_pretrain_cook", "main_finetune"])
def test_every_flag_has_help_and_shows_its_default(script):
    import importlib

    parser = importlib.import_module(script).build_parser()
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and a.dest != "help" and (not a.help or "default:" not in a.help)
               and not a.required]
    assert not missing, f"{script}: flags without help or default: {missing}"
