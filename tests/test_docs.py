"""The docs tell the truth: the layout page is the package's tree as it is, the API page names every public name,
and the site builds with `mkdocs build --strict`. Regenerate the layout with `python tests/test_docs.py`."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
PACKAGE = PROJECT / "peft_adapt"
DOCS = PROJECT / "docs"


def _first_line(path: Path) -> str:
    """The docstring's first phrase: its first paragraph up to the first '. ', ': ' or '; ' past 20 characters."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    text = " ".join(doc.strip().split("\n\n")[0].split())
    cuts = [i for i in (text.find(mark, 20) for mark in (". ", ": ", "; ")) if i > 0]
    return (text[: min(cuts)] if cuts else text).rstrip(".")


def layout_tree() -> str:
    """The package's folders and modules, each with the first line of its docstring."""
    lines = ["peft_adapt/"]

    def entry(indent: int, name: str, path: Path) -> None:
        lines.append(f"{'  ' * indent}{name:<{24 - 2 * indent}}{_first_line(path)}".rstrip())

    for path in sorted(PACKAGE.glob("*.py")):
        entry(1, path.name, path)
    for folder in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        entry(1, folder.name + "/", folder / "__init__.py")
        for path in sorted(folder.glob("*.py")):
            if path.name != "__init__.py":
                entry(2, path.name, path)
    return "\n".join(lines) + "\n"


def _block(text: str, marker: str) -> str | None:
    found = re.search(rf"<!-- {marker}:begin -->\n```text\n(.*?)```\n<!-- {marker}:end -->", text, re.S)
    return found.group(1) if found else None


def test_the_layout_page_is_the_package_as_it_is():
    page = (DOCS / "layout.md").read_text(encoding="utf-8")
    assert _block(page, "layout") == layout_tree(), "regenerate it with: python tests/test_docs.py"


def test_the_api_page_names_every_public_name_and_each_imports():
    import peft_adapt

    page = (DOCS / "api.md").read_text(encoding="utf-8")
    missing = [name for name in peft_adapt.__all__ if f"`{name}`" not in page and name != "__version__"]
    assert missing == []
    for name in peft_adapt.__all__:
        assert getattr(peft_adapt, name) is not None


def test_importing_the_package_pulls_no_torch():
    code = "import sys, peft_adapt; peft_adapt.UserInputError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_site_builds_strictly(tmp_path):
    if shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mkdocs is not installed (the dev extra has it)")
    mkdocs = str(Path(sys.executable).parent / "mkdocs")
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


if __name__ == "__main__":
    page_path = DOCS / "layout.md"
    page = page_path.read_text(encoding="utf-8")
    new = re.sub(r"(<!-- layout:begin -->\n```text\n).*?(```\n<!-- layout:end -->)",
                 lambda m: m.group(1) + layout_tree() + m.group(2), page, flags=re.S)
    page_path.write_text(new, encoding="utf-8")
    print(layout_tree())
