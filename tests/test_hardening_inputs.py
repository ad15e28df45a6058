"""What an unlucky user's (or an attacker's) files and flags do to the offline commands: recipes whose names are
paths, output folders that are not ours, meta-training settings that cannot work, data files that do not parse.
Each test failed on main before the second hardening round (issue 30)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import causal_recipe

from peft_adapt import UserInputError, parse_recipe
from peft_adapt.training.domain import train_recipe


def _cli(tmp_path: Path, *args: str):
    """The CLI in this process (its start costs 10 s as a subprocess): (exit code, stderr)."""
    import contextlib
    import io

    from peft_adapt.cli.main import main

    err, here = io.StringIO(), os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(args, code, "", err.getvalue())


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


# ---- item 11: data files that do not parse are one clear line, never a traceback or a 6 GB label map


def _rows(tmp_path: Path, text: str, suffix: str = ".csv"):
    from peft_adapt.data.readers import read_rows

    path = tmp_path / f"d{suffix}"
    path.write_text(text, encoding="utf-8")
    return read_rows(path)


def test_a_csv_row_longer_than_its_header_is_named(tmp_path):
    with pytest.raises(UserInputError, match="row 2: 4 fields, the header names 2"):
        _rows(tmp_path, "label,text\n1,fine\n0,a,b,c\n")


def test_a_csv_field_of_200_kb_is_read_and_one_past_the_limit_is_named(tmp_path):
    from peft_adapt.data.readers import MAX_CSV_FIELD

    rows = _rows(tmp_path, f'label,text\n1,"{"word " * 40_000}"\n')
    assert len(rows[0][1]["text"]) == 200_000
    with pytest.raises(UserInputError, match="row 1: not CSV this reader takes"):
        _rows(tmp_path, f'label,text\n1,"{"x" * (MAX_CSV_FIELD + 1)}"\n')


@pytest.mark.parametrize("labels,message", [(["²", "a"], "digits other than 0-9"), (["٣", "a"], "digits other than 0-9"),
                                            (["", "a"], "is empty"), (["  ", "a"], "is empty"),
                                            ([0, 10**12], "past 100,000")])
def test_labels_that_cannot_be_classes_are_named(tmp_path, labels, message):
    from peft_adapt.data.examples import build_label_map

    rows = [(i + 1, {"text": "t", "label": label}) for i, label in enumerate(labels)]
    with pytest.raises(UserInputError, match=message):
        build_label_map(rows, tmp_path / "d.jsonl")


def test_ascii_ids_and_names_still_build_their_maps(tmp_path):
    from peft_adapt.data.examples import build_label_map

    assert build_label_map([(1, {"label": "2"}), (2, {"label": 0})], tmp_path).names == ["0", "1", "2"]
    assert build_label_map([(1, {"label": "pos"}), (2, {"label": "neg"})], tmp_path).names == ["neg", "pos"]


# ---- item 12: `classify --file` reads its file as it goes, and bounds a line


def test_inputs_are_read_as_they_are_consumed(tmp_path):
    from peft_adapt.data import iter_texts

    path = tmp_path / "texts.txt"
    path.write_bytes(b"first text\n" * 1000 + b"\xff broken\n")
    items = iter_texts(path)
    assert next(items) == (1, "first text")  # the broken line far below is not read yet
    with pytest.raises(UserInputError, match="line 1001: byte 0xff is not UTF-8"):
        list(items)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_line_past_the_bound_is_refused_once_that_much_is_read(tmp_path, suffix):
    from peft_adapt.data import iter_texts

    path = tmp_path / f"one-line{suffix}"
    with open(path, "wb") as f:  # a 2 GiB single line, sparse: only what is read costs anything
        f.truncate(2 << 30)
    with pytest.raises(UserInputError, match="line 1 is longer than 16 MiB"):
        next(iter_texts(path))


def test_jsonl_and_text_files_give_what_they_gave_before(tmp_path):
    from peft_adapt.data import read_texts

    (tmp_path / "a.jsonl").write_text('{"text": "x", "id": "r1"}\n\n{"text": "y\\u2028z"}\n', encoding="utf-8")
    assert read_texts(tmp_path / "a.jsonl") == [("r1", "x"), (3, "y\u2028z")]
    (tmp_path / "b.txt").write_text("one\r\n\n two\x0cthree\n", encoding="utf-8")
    assert read_texts(tmp_path / "b.txt") == [(1, "one"), (3, " two\x0cthree")]
    (tmp_path / "c.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UserInputError, match="every line is blank"):
        read_texts(tmp_path / "c.txt")
