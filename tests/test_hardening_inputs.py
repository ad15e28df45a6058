"""What an unlucky user's (or an attacker's) files and flags do to the offline commands: recipes whose names are
paths, output folders that are not ours, meta-training settings that cannot work, data files that do not parse.
Each test failed on main before the second hardening round (issue 30)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import causal_recipe

from peft_adapt import UserInputError, parse_recipe
from peft_adapt.training.domain import train_recipe


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peft_adapt.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=os.environ)


def _precious(folder: Path) -> Path:
    (folder / "d").mkdir(parents=True)
    kept = folder / "d" / "precious.txt"
    kept.write_text("keep me")
    return kept


# ---- item 1: a recipe's name, or an output folder, never replaces a user's folder


def test_a_recipe_name_that_is_a_path_is_refused_before_anything_is_written(tmp_path, tiny_llama, docs_file):
    kept = _precious(tmp_path / "home")
    recipe = causal_recipe(tiny_llama, docs_file, max_steps=1) | {"name": str(tmp_path / "home"),
                                                                  "domains": {"d": {"train": str(docs_file)}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    done = _cli(tmp_path, "train", "r.yaml")
    assert done.returncode != 0 and "name" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert kept.read_text() == "keep me" and sorted(p.name for p in (tmp_path / "home").rglob("*")) == ["d", "precious.txt"]
    with pytest.raises(UserInputError, match="name '../x'"):
        parse_recipe(causal_recipe(tiny_llama, docs_file) | {"name": "../x"})


def test_an_output_folder_of_other_files_is_refused_even_with_overwrite(tmp_path, tiny_llama, docs_file):
    kept = _precious(tmp_path / "out")
    recipe = causal_recipe(tiny_llama, docs_file, max_steps=1) | {"domains": {"d": {"train": str(docs_file)}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    done = _cli(tmp_path, "train", "r.yaml", "--no-register", "--out", "out", "--overwrite")
    assert done.returncode != 0 and "never replaced" in done.stderr and "Traceback" not in done.stderr, done.stderr
    for flags in ({}, {"resume": True}):
        with pytest.raises(UserInputError, match="never replaced"):
            train_recipe(parse_recipe(recipe), tmp_path / "out", **flags)
    assert kept.read_text() == "keep me"


def test_a_previous_run_is_replaced_only_with_overwrite(tmp_path, tiny_llama, docs_file):
    recipe = parse_recipe(causal_recipe(tiny_llama, docs_file, max_steps=1, threads=1))
    first = train_recipe(recipe, tmp_path / "out")[0]
    before = (first.out_dir / "manifest.json").read_bytes()
    with pytest.raises(UserInputError, match="holds a previous run; pass --overwrite"):
        train_recipe(recipe, tmp_path / "out")
    assert (first.out_dir / "manifest.json").read_bytes() == before
    again = train_recipe(recipe, tmp_path / "out", overwrite=True)[0]
    assert (again.out_dir / "manifest.json").read_bytes() != before  # a new run (its creation time) replaced it


def test_a_name_too_long_for_the_registry_is_refused_before_training(tmp_path, tiny_llama, docs_file):
    recipe = parse_recipe(causal_recipe(tiny_llama, docs_file) | {"name": "n" * 128})
    with pytest.raises(UserInputError, match="is not allowed"):
        train_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- item 11: meta-training settings that cannot work


@pytest.mark.parametrize("field,value", [("meta_lr", float("nan")), ("meta_lr", 0.0), ("inner_steps", 0),
                                         ("meta_steps", 0), ("inner_lr", float("inf"))])
def test_meta_train_refuses_settings_that_cannot_work(field, value):
    from peft_adapt.training.meta import MetaSettings

    with pytest.raises(UserInputError, match=f"--{field.replace('_', '-')}"):
        MetaSettings(**{field: value})


def test_meta_train_cli_says_which_flag_in_one_line(tmp_path, tiny_llama, docs_file):
    recipe = causal_recipe(tiny_llama, docs_file) | {"domains": {"a": str(docs_file), "b": str(docs_file)}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    done = _cli(tmp_path, "meta-train", "r.yaml", "--no-register", "--meta-lr", "nan")
    assert done.returncode != 0 and "--meta-lr" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "runs").exists()
