"""One grammar for adapter references: every spelling parsed in one place, to one canonical value."""

from __future__ import annotations

import pytest

from peft_adapt import UserInputError, parse_ref
from peft_adapt.registry.refs import Auto, Base, Folder, Mix, Named, Stack, mix_of


@pytest.mark.parametrize("text, parsed, canonical", [
    ("base", Base(), "base"), ("none", Base(), "base"), ("", Base(), "base"), (None, Base(), "base"),
    ("books", Named("books"), "books"),
    ("books@latest", Named("books"), "books"),
    ("books@3", Named("books", version=3), "books@3"),
    ("books@0", Named("books", version=0), "books@0"),
    ("books@prod", Named("books", tag="prod"), "books@prod"),
    ("./runs/books", Folder("./runs/books"), "./runs/books"),
    ("runs/books", Folder("runs/books"), "runs/books"),
    ("~/books", Folder("~/books"), "~/books"),
    ("dom@2+task", Stack((Named("dom", version=2), Named("task"))), "dom@2+task"),
    ("auto", Auto(), "auto"),
    ("auto:prod", Auto(tag="prod"), "auto:prod"),
    ("auto:b,a@latest,a", Auto(names=("a", "b")), "auto:a,b"),
    ("~mix:b=0.4,a=0.6", Mix((("a", 0.6), ("b", 0.4))), "~mix:a=0.60,b=0.40"),
])
def test_every_spelling_parses_to_one_value_with_one_canonical_spelling(text, parsed, canonical):
    assert parse_ref(text) == parsed
    assert str(parse_ref(text)) == canonical
    assert parse_ref(str(parse_ref(text))) == parsed  # the canonical spelling reads back as itself


@pytest.mark.parametrize("text, message", [
    ("code@01", "without leading zeros"),
    ("code@007", "without leading zeros"),
    ("code@\u0661", "ASCII digits"),            # an Arabic-Indic one
    ("code@\U0001d7d9", "ASCII digits"),       # a mathematical digit one
    ("a+b+c+d+e", "at most 4"),
    ("a+a", "at most 4 different adapters, each once"),
    ("a++b", "joined by"),
    ("auto:" + ",".join(f"n{i}" for i in range(65)), "at most 64"),
    ("~mix:a=lots", "not a routed mix"),
    ("bad name", "not allowed"),
])
def test_a_malformed_reference_is_refused_saying_what_is_wrong(text, message):
    with pytest.raises(UserInputError, match=message):
        parse_ref(text)


def test_a_path_is_refused_where_only_names_are_read():
    with pytest.raises(UserInputError, match="only registered adapter names"):
        parse_ref("../../etc", folders=False)
    with pytest.raises(UserInputError, match="only registered adapter names"):
        parse_ref("dom+./task", folders=False)


def test_names_that_mean_the_base_or_the_router_cannot_be_registered():
    from peft_adapt.registry.refs import check_name

    for reserved in ("base", "none", "auto"):
        with pytest.raises(UserInputError, match="reserved"):
            check_name(reserved)
    assert check_name("base-model") == "base-model"


def test_a_mix_made_from_weights_is_the_mix_its_name_reads_as():
    mix = mix_of({"b": 0.4, "a": 0.6})
    assert parse_ref(str(mix)) == mix and mix.as_dict() == {"a": 0.6, "b": 0.4}
