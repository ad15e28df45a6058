"""Recipes: every mistake is named by file and key; overrides and path rules behave as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peft_adapt import UserInputError, load_recipe, parse_recipe

PROJECT = Path(__file__).resolve().parents[1]
MINIMAL = {"base": {"model": "smollm2-135m"}, "task": {"type": "causal_lm"}, "domains": {"a": "a.jsonl"}}


def _write(tmp_path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_is_named_with_the_known_ones(tmp_path):
    path = _write(tmp_path, MINIMAL | {"training": {"lr": 0.1}})
    with pytest.raises(UserInputError, match=r"recipe.yaml: invalid recipe:\n  training.lr: unknown key; known keys here: epochs, max_steps"):
        load_recipe(path)


def test_wrong_type_is_named_with_what_was_found(tmp_path):
    path = _write(tmp_path, MINIMAL | {"training": {"batch_size": "many"}})
    with pytest.raises(UserInputError, match=r"training.batch_size: Input should be a valid integer.*\(found 'many'\)"):
        load_recipe(path)


def test_unknown_quantization_names_the_choices(tmp_path):
    path = _write(tmp_path, MINIMAL | {"base": {"model": "x", "quantization": "q3"}})
    with pytest.raises(UserInputError, match=r"base.quantization: Input should be 'none', 'int8', 'nf4' or 'fp4'"):
        load_recipe(path)


def test_adapter_and_freeze_together_are_refused():
    with pytest.raises(UserInputError, match="either adapter: .* or freeze:"):
        parse_recipe(MINIMAL | {"adapter": {"r": 4}, "freeze": "all", "task": {"type": "classification"}})


def test_relative_data_paths_are_read_from_the_recipe_folder(tmp_path):
    recipe = load_recipe(_write(tmp_path, MINIMAL))
    assert recipe.data_path(recipe.domain("a").train) == tmp_path / "a.jsonl"


def test_overrides_set_and_remove_keys(tmp_path):
    path = _write(tmp_path, MINIMAL | {"adapter": {"r": 4}, "task": {"type": "classification"}})
    recipe = load_recipe(path, ["adapter=null", "freeze=all", "training.max_steps=7", "base.quantization=none"])
    assert recipe.adapter is None and recipe.freeze == "all" and recipe.training.max_steps == 7
    with pytest.raises(UserInputError, match="expected KEY.PATH=VALUE"):
        load_recipe(path, ["training.max_steps"])


def test_unknown_domain_is_named():
    recipe = parse_recipe(MINIMAL)
    with pytest.raises(UserInputError, match=r"no domain 'b'; the recipe has \['a'\]"):
        recipe.domain("b")


@pytest.mark.parametrize("path", sorted((PROJECT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert recipe.domains


def test_an_alias_bomb_is_refused_before_it_expands_and_a_few_aliases_still_load(tmp_path):
    """Nine lines of nested aliases stand for 10^9 values; validating them hung the process (issue 30, item 11)."""
    levels = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    levels += [f"a{i}: &a{i} [{', '.join(f'*a{i - 1}' for _ in range(10))}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\nname: *a9\n")
    with pytest.raises(UserInputError, match=r"stands for [0-9,]{14,} values once its aliases"):
        load_recipe(bomb)
    shared = tmp_path / "shared.yaml"
    shared.write_text(
        "name: t\nbase: {model: smollm2-135m}\ntask: {type: causal_lm}\ntraining: {max_steps: 3}\n"
        "domains:\n  a: &same {train: a.jsonl}\n  b: *same\n")
    assert load_recipe(shared).domains["b"].train == "a.jsonl"
    with pytest.raises(UserInputError, match="at most 1000000"):
        (big := tmp_path / "big.yaml").write_text("# " + "x" * 1_000_001)
        load_recipe(big)
