"""The README and the docs tell the truth: the recipe reference is the code's defaults, every command in them parses,
and the README stays a page a newcomer reads in five minutes."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from conftest import PROJECT

from peft_adapt import parse_recipe, parse_ref
from peft_adapt.cli.main import build_parser
from peft_adapt.training.recipe import recipe_reference

README = (PROJECT / "README.md").read_text(encoding="utf-8")
PAGES = [README] + [p.read_text(encoding="utf-8") for p in sorted((PROJECT / "docs").glob("*.md"))]
REFERENCE = (PROJECT / "docs" / "recipes.md").read_text(encoding="utf-8")


def test_the_recipe_reference_is_the_codes_defaults():
    block = re.search(r"<!-- recipe-reference:begin -->\n```yaml\n(.*?)```\n<!-- recipe-reference:end -->", REFERENCE, re.S)
    assert block, "docs/recipes.md lost its recipe reference markers"
    assert block.group(1) == recipe_reference(), "regenerate it with: python -m peft_adapt.training.recipe"
    recipe = parse_recipe(yaml.safe_load(block.group(1)))  # and it is a recipe that validates as shown
    assert recipe.adapter.r == 16 and recipe.training.learning_rate == 2e-4


def _readme_commands() -> list[list[str]]:
    """Every `peft-adapt ...` (or `-m peft_adapt.cli ...`) command in the README's and the docs' bash blocks, as argv; a
    synopsis's optional parts (`[--dtype bf16|fp16|fp32]`) are taken with their first choice."""
    commands = []
    for block in (b for page in PAGES for b in re.findall(r"```bash\n(.*?)```", page, re.S)):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(\S+)\|\S+", lambda m: m.group(1).split("|")[0], line.replace("[", "").replace("]", ""))
            words = shlex.split(line, comments=True)
            if words and words[0] == "peft-adapt":
                commands.append(words[1:])
            elif "peft_adapt.cli" in words:
                commands.append(words[words.index("peft_adapt.cli") + 1:])
    return commands


COMMANDS = _readme_commands()


def test_the_readme_is_a_page_a_newcomer_reads_in_five_minutes():
    assert len(README.splitlines()) <= 200
    assert "make quickstart" in README and "make test" in README


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) > 20
    assert {c[0] for c in COMMANDS} >= {"train", "eval", "registry", "generate", "classify", "merge", "export", "serve"}


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv)[:60])
def test_every_readme_command_parses_and_names_valid_adapters(argv):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`peft-adapt {' '.join(argv)}` does not parse (exit {exc.code})")
    for key in ("name", "ref", "adapter"):
        value = getattr(args, key, None)
        if isinstance(value, str):
            parse_ref(value)  # the one grammar: a name, name@v, a folder, a stack domain+task, auto...
