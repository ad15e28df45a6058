"""The layers hold: methods are asked through their table, storage loads no models, merging reads no runtime."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import PROJECT

from peft_adapt.methods import TABLE

PACKAGE = PROJECT / "peft_adapt"
PEFT_TYPES = {"LORA", "PREFIX_TUNING", "IA3", "ADALORA", "PROMPT_TUNING"}


def _sources(exclude: tuple[str, ...] = ()) -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py"))
            if not any(str(p.relative_to(PACKAGE)).startswith(e) for e in exclude)]


def _imports(path: Path) -> set[str]:
    """Modules `path` imports (absolute, e.g. `peft_adapt.loading`), at any depth of the file."""
    module = ".".join(path.relative_to(PROJECT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
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


def test_no_layer_outside_methods_compares_a_method_name_or_peft_type():
    names = set(TABLE) | PEFT_TYPES
    offenders = []
    for path in _sources(exclude=("methods/", "formats.py")):
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
    for name in ("registry.py", "registry_index.py", "object_store.py", "formats.py", "model_files.py", "fingerprint.py"):
        imported = _imports(PACKAGE / name)
        # (torch is imported lazily by formats.py to convert allowed pickle weights: reading tensors, not models)
        for forbidden in ("peft_adapt.loading", "peft_adapt.backbone", "peft_adapt.methods", "peft_adapt.runtime",
                          "transformers", "peft"):
            assert not any(i == forbidden or i.startswith(forbidden + ".") for i in imported), (name, forbidden)


def test_merging_reads_weights_through_the_method_table_not_the_runtime():
    for path in sorted((PACKAGE / "merge").glob("*.py")):
        runtime = {i for i in _imports(path) if i.startswith("peft_adapt.runtime")}
        # the export's fidelity check runs the runtime: the reference "as served"; nothing else in merge/ does
        allowed = {"peft_adapt.runtime", "peft_adapt.runtime.AdapterRuntime"} if path.name == "export.py" else set()
        assert runtime <= allowed, (path.name, runtime)
