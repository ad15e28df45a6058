"""Domain adaptation as a table: a method is a module and a line; its settings are a nested recipe section; recipes
written with the earlier flat keys are still read."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import classification_recipe, write_jsonl

from peft_adapt import adaptation_methods, parse_recipe, train_domain
from peft_adapt.adaptation.entropy import information_loss


def _target(tmp_path):
    rows = [{"text": " ".join(["superb", "dreadful"][i % 2] for _ in range(5))} for i in range(32)]
    return str(write_jsonl(tmp_path / "target.jsonl", rows))


def test_the_table_holds_every_method_and_each_nested_section_is_read(tiny_bert, sentiment_file, tmp_path):
    assert set(adaptation_methods) == {"dann", "coral", "mmd", "entropy", "adda", "generate", "none"}
    data = classification_recipe(tiny_bert, sentiment_file, max_steps=4)
    data["domain_adaptation"] = {"method": "dann", "target": _target(tmp_path),
                                 "dann": {"gamma": 5.0, "adversary": "reversal"}}
    spec = parse_recipe(data).domain_adaptation
    assert (spec.dann.gamma, spec.dann.adversary, spec.dann.hidden) == (5.0, "reversal", 256)


def test_a_recipe_with_the_earlier_flat_keys_is_read_with_one_notice(tiny_bert, sentiment_file, tmp_path, caplog):
    data = classification_recipe(tiny_bert, sentiment_file, max_steps=4)
    data["domain_adaptation"] = {"method": "adda", "target": _target(tmp_path), "adda_steps": 6,
                                 "adda_learning_rate": 1e-3, "dann_hidden": 32}
    with caplog.at_level(logging.WARNING, logger="peft_adapt.adaptation.spec"):
        spec = parse_recipe(data).domain_adaptation
    assert (spec.adda.steps, spec.adda.learning_rate, spec.adda.hidden) == (6, 1e-3, 32)
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "adda_steps -> adda.steps" in notices[0]


def test_settings_for_another_method_are_refused(tiny_bert, sentiment_file, tmp_path):
    data = classification_recipe(tiny_bert, sentiment_file, max_steps=4)
    data["domain_adaptation"] = {"method": "coral", "target": _target(tmp_path), "dann": {"gamma": 5.0}}
    with pytest.raises(Exception, match="dann: is for method dann, not coral"):
        parse_recipe(data)


def test_the_entropy_term_prefers_confident_rows_that_use_every_class():
    def term(logits, diversity=1.0):
        return float(information_loss(torch.tensor(logits), diversity))

    uniform = [[0.0, 0.0]] * 4
    collapsed = [[9.0, -9.0]] * 4
    balanced = [[9.0, -9.0], [-9.0, 9.0]] * 2
    assert term(uniform, diversity=0) == pytest.approx(math.log(2))
    assert term(collapsed, diversity=0) == pytest.approx(0, abs=1e-6)  # entropy alone: collapse is as good as it gets
    assert term(balanced) == pytest.approx(-math.log(2), abs=1e-6)    # with diversity, the balanced rows win
    assert term(collapsed) == pytest.approx(0, abs=1e-6) and term(uniform) == pytest.approx(0, abs=1e-6)


def test_the_entropy_method_trains_a_classifier_through_the_table(tiny_bert, sentiment_file, tmp_path):
    data = classification_recipe(tiny_bert, sentiment_file, max_steps=6, logging_steps=2)
    data["domain_adaptation"] = {"method": "entropy", "target": _target(tmp_path), "safeguard": False}
    result = train_domain(parse_recipe(data), "sentiment", tmp_path / "out")
    terms = [e["entropy_loss"] for e in json.loads((result.out_dir / "log_history.json").read_text())
             if "entropy_loss" in e]
    assert terms and all(math.isfinite(t) and -math.log(2) - 1e-6 <= t <= math.log(2) + 1e-6 for t in terms)
