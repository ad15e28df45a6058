"""The layers hold: one folder per layer, imports point only down (function-local ones included), no circle; methods
are asked through their table, storage loads no models, merging reads no runtime."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import PROJECT

from peft_adapt.methods import TABLE

PACKAGE = PROJECT / "peft_adapt"
PEFT_TYPES = {"LORA", "PREFIX_TUNING", "IA3", "ADALORA", "PROMPT_TUNING"}
# bottom first: a folder may import its own modules, the folders before it, and the root's `errors` and `faults`
LAYERS = ["models", "formats", "methods", "data", "registry", "routing", "runtime", "adaptation", "training", "merge",
          "server", "cli"]
ROOT_MODULES = {"errors", "faults"}  # imported by every layer; they import nothing of the package
ASIDE = {"testing"}  # used by tests and benchmarks; no library module imports it


def _sources(exclude: tuple[str, ...] = ()) -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py"))
            if not any(str(p.relative_to(PACKAGE)).startswith(e) for e in exclude)]


def _module(path: Path) -> str:
    parts = path.relative_to(PROJECT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules `path` imports (absolute, e.g. `peft_adapt.runtime.loading`), at any depth of the file."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found |= {f"{name}.{alias.name}" for alias in node.names}
    return found


def _package_modules() -> dict[str, Path]:
    return {_module(p): p for p in _sources()}


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (a name imported from a module counts as that module)."""
    modules = _package_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and imported != "peft_adapt":
                targets.add(imported)
        graph[name] = targets
    return graph


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_root_holds_only_the_public_api_and_what_every_layer_imports():
    root = {p.stem for p in PACKAGE.glob("*.py")}
    assert root <= {"__init__"} | ROOT_MODULES, root - ({"__init__"} | ROOT_MODULES)
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(LAYERS) | ASIDE, folders ^ (set(LAYERS) | ASIDE)


def test_every_import_points_down_a_layer():
    upward = []
    for module, targets in _graph().items():
        if module == "peft_adapt":  # the public API re-exports every layer
            continue
        folder = _folder(module)
        for target in targets:
            to = _folder(target)
            if to in ASIDE and folder not in ASIDE:
                upward.append(f"{module} -> {target} (the library never imports testing/)")
            elif folder in ROOT_MODULES:
                upward.append(f"{module} -> {target} (a root module imports nothing of the package)")
            elif folder in LAYERS and to in LAYERS and LAYERS.index(to) > LAYERS.index(folder):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_import_circle_between_modules_or_folders():
    graph = _graph()
    assert _cycles(graph) == []
    folders: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module != "peft_adapt":
            folders.setdefault(_folder(module), set()).update(_folder(t) for t in targets if _folder(t) != _folder(module))
    assert _cycles(folders) == []


def test_a_function_local_import_of_the_package_says_why_it_is_lazy():
    """Imports of the package's own modules sit at the top of a module, except where one keeps a heavy dependency
    lazy (the CLI starts without torch; recipes do not load the runtime): those say so in a comment."""
    unexplained = []
    for path in _sources():
        lines = path.read_text().splitlines()
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in function.body:
                for inner in ast.walk(node):
                    own = isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or "").startswith("peft_adapt"))
                    said = own and any("lazy" in line for line in lines[inner.lineno - 2: inner.end_lineno])
                    if own and not said:
                        unexplained.append(f"{path.relative_to(PROJECT)}:{inner.lineno}")
    assert sorted(set(unexplained)) == []


def test_the_layer_check_finds_an_upward_import_and_a_circle():
    """The checks above can fail: an upward edge and a two-module circle planted in a copy of the graph are found."""
    graph = {k: set(v) for k, v in _graph().items()}
    graph["peft_adapt.models.backbone"].add("peft_adapt.runtime.loading")
    graph["peft_adapt.runtime.loading"].add("peft_adapt.models.backbone")
    assert ["peft_adapt.models.backbone", "peft_adapt.runtime.loading"] in _cycles(graph)


def test_no_layer_outside_methods_compares_a_method_name_or_peft_type():
    names = set(TABLE) | PEFT_TYPES
    offenders = []
    for path in _sources(exclude=("methods/", "formats/")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            parts = [node.left, *node.comparators]
            literals = {p.value for p in parts if isinstance(p, ast.Constant) and isinstance(p.value, str)}
            literals |= {e.value for p in parts if isinstance(p, (ast.Tuple, ast.List, ast.Set))
                         for e in p.elts if isinstance(e, ast.Constant)}
            mentions_type = any(isinstance(p, ast.Attribute) and p.attr == "peft_type" for p in parts)
            if literals & names or mentions_type:
                offenders.append(f"{path.relative_to(PROJECT)}:{node.lineno}")
    assert offenders == []


def test_storage_imports_neither_model_loading_nor_methods():
    storage = [p for p in _sources() if _folder(_module(p)) in ("registry", "formats")]
    storage += [PACKAGE / "models" / "model_files.py", PACKAGE / "models" / "fingerprint.py"]
    for path in storage:
        imported = _imports(path)
        # (torch is imported lazily by formats/ to convert allowed pickle weights: reading tensors, not models)
        for forbidden in ("peft_adapt.runtime", "peft_adapt.models.backbone", "peft_adapt.methods", "transformers",
                          "peft"):
            assert not any(i == forbidden or i.startswith(forbidden + ".") for i in imported), (path.name, forbidden)


def test_merging_reads_weights_through_the_method_table_not_the_runtime():
    for path in sorted((PACKAGE / "merge").glob("*.py")):
        runtime = {i for i in _imports(path) if i.startswith("peft_adapt.runtime")}
        # the exports' fidelity checks run the runtime: the reference "as served"; nothing else in merge/ does
        fidelity = ("fidelity.py", "gguf_fidelity.py")
        allowed = {"peft_adapt.runtime", "peft_adapt.runtime.AdapterRuntime"} if path.name in fidelity else set()
        assert runtime <= allowed, (path.name, runtime)


def test_an_independent_import_graph_agrees(tmp_path):
    """import-linter builds its own graph (function-local imports included) and checks the same layers
    (pyproject.toml's [tool.importlinter])."""
    import shutil
    import subprocess
    import sys

    import pytest

    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (the dev extra has it)")
    done = subprocess.run([lint, "--no-cache"], cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 kept, 0 broken" in done.stdout
