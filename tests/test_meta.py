"""Meta-learned initialisation (Reptile): the outer step, and a new domain adapting faster from it."""

from __future__ import annotations

import random

import torch
from conftest import classification_recipe, write_jsonl

from peft_adapt import Registry, parse_recipe, train_domain
from peft_adapt.cli.main import main
from peft_adapt.training.meta import reptile_step

SENTIMENT = (["bad", "awful", "poor", "sad"], ["good", "great", "nice", "fine"])


def test_the_outer_step_moves_the_initialisation_toward_the_adapted_weights():
    generator = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, generator=generator), torch.randn(5, generator=generator)]
    adapted = [t + torch.randn(t.shape, generator=generator) for t in init]
    before = [(a - i).norm() for a, i in zip(adapted, init)]
    reptile_step(init, adapted, 0.25)
    assert all(torch.isclose((a - i).norm(), 0.75 * b) for a, i, b in zip(adapted, init, before))
    reptile_step(init, adapted, 1.0)
    assert all(torch.equal(a, i) for a, i in zip(adapted, init))


def _domain(tmp_path, name: str, seed: int):
    """A family of tasks: each domain has its own topic words; the label is the sentiment word's class."""
    rng = random.Random(seed)
    topic = [f"{name}{k}" for k in range(6)]
    rows = []
    for i in range(64):
        label = i % 2
        words = [rng.choice(topic) for _ in range(6)] + [rng.choice(SENTIMENT[label])]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return write_jsonl(tmp_path / f"{name}.jsonl", rows)


def test_a_meta_learned_initialisation_adapts_in_fewer_steps(tmp_path, tiny_bert, capsys):
    registry = Registry(tmp_path / "reg")
    recipe = classification_recipe(tiny_bert, _domain(tmp_path, "a", 1), learning_rate=1e-2, batch_size=16)
    recipe["domains"] = {n: {"train": str(_domain(tmp_path, n, s))} for n, s in (("a", 1), ("b", 2), ("c", 3))}
    recipe_file = tmp_path / "family.yaml"
    import yaml

    recipe_file.write_text(yaml.safe_dump(recipe))
    assert main(["meta-train", str(recipe_file), "--out", str(tmp_path / "meta"), "--registry", str(registry.root),
                 "--meta-steps", "15", "--inner-steps", "4"]) == 0
    assert "meta:" in capsys.readouterr().out and registry.get("t-meta").name == "t-meta"
    new = _domain(tmp_path, "z", 9)
    scores = {}
    for start in ("fresh", "meta"):
        few = classification_recipe(tiny_bert, new, max_steps=3, learning_rate=1e-2, batch_size=16)
        few["domains"] = {"z": {"train": str(new), "test": str(new)}}
        if start == "meta":
            few["init_from"] = "t-meta"
        result = train_domain(parse_recipe(few), "z", tmp_path / start, registry=registry)
        scores[start] = result.metrics["test"]
    assert scores["meta"]["accuracy"] > scores["fresh"]["accuracy"] + 0.1, scores
