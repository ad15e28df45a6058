"""Few-shot training (`training.shots`) and adapters started from a registered one (`init_from`)."""

from __future__ import annotations

import pytest
from conftest import classification_recipe, write_jsonl
from safetensors.torch import load_file

from peft_adapt import Registry, UserInputError, parse_recipe, train_domain
from peft_adapt.data import TaskSpec, read_domain
from peft_adapt.testing.tiny_models import build_tiny_model


def test_shots_draws_exactly_k_rows_per_class_with_the_seed(tmp_path):
    rows = [{"text": f"row {i}", "label": ["a", "b", "c"][i % 3]} for i in range(90)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    task = TaskSpec(type="classification")

    def drawn(seed, shots=4):
        examples = read_domain(task, path, seed=seed, shots=shots)
        return [e.text for e in examples.train], [e.label for e in examples.train]

    texts, labels = drawn(0)
    assert sorted(labels) == [0] * 4 + [1] * 4 + [2] * 4
    assert drawn(0)[0] == texts and drawn(1)[0] != texts  # the same seed draws the same rows, another seed others
    with pytest.raises(UserInputError, match="asks for 40 rows of class 'a'"):
        drawn(0, shots=40)


def _weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_init_from_starts_the_adapter_from_a_registered_one(tmp_path, tiny_bert, sentiment_file):
    registry = Registry(tmp_path / "reg")
    source = train_domain(parse_recipe(classification_recipe(tiny_bert, sentiment_file, max_steps=6)), "sentiment",
                          tmp_path / "a")
    registry.add(source.out_dir)
    # one step at a vanishing rate: what it saves is where it started
    recipe = classification_recipe(tiny_bert, sentiment_file, max_steps=1, learning_rate=1e-12, warmup_steps=0)
    started = train_domain(parse_recipe(recipe | {"init_from": "t-sentiment"}), "sentiment", tmp_path / "b",
                           registry=registry)
    fresh = train_domain(parse_recipe(recipe), "sentiment", tmp_path / "c")
    a, b, c = _weights(source.out_dir), _weights(started.out_dir), _weights(fresh.out_dir)
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-6  # head included: same labels
    assert any((a[k].float() - c[k].float()).abs().max() > 1e-3 for k in a if "lora_B" in k)  # fresh B is zero
    assert started.metrics["init_from"]["ref"] == "t-sentiment@1" and started.metrics["init_from"]["head"]


def test_init_from_refuses_another_base_method_or_shape(tmp_path, tiny_bert, sentiment_file):
    registry = Registry(tmp_path / "reg")
    other_base = build_tiny_model(tmp_path / "other-bert", "bert", seed=7)
    recipe = classification_recipe(tiny_bert, sentiment_file, max_steps=1)
    for name, changed in (("other-base", classification_recipe(other_base, sentiment_file, max_steps=1)),
                          ("rank-4", recipe | {"adapter": recipe["adapter"] | {"r": 4}}),
                          ("ia3", recipe | {"adapter": {"method": "ia3"}})):
        result = train_domain(parse_recipe(changed), "sentiment", tmp_path / name)
        registry.add(result.out_dir, name=name)
    for name, message in (("other-base", "not this recipe's"), ("rank-4", "does not have this adapter's shape"),
                          ("ia3", "is a ia3 adapter; this recipe trains lora")):
        with pytest.raises(UserInputError, match=message):
            train_domain(parse_recipe(recipe | {"init_from": name}), "sentiment", tmp_path / f"x-{name}",
                         registry=registry)
    with pytest.raises(UserInputError, match="init_from starts an adapter"):
        parse_recipe(recipe | {"adapter": None, "freeze": "all", "init_from": "rank-4"})
    assert {e.name for e in registry.list()} == {"other-base", "rank-4", "ia3"}
