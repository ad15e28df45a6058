"""Our NER scorer against seqeval (conlleval's reading of BIO), on CoNLL-2003 and on any sequence of tags."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from seqeval.metrics import f1_score, precision_score, recall_score

from peft_adapt.training.metrics import entity_metrics

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]


def _agree(predicted, gold) -> None:
    ours = entity_metrics(predicted, gold)
    assert ours["precision"] == pytest.approx(precision_score(gold, predicted), abs=1e-12)
    assert ours["recall"] == pytest.approx(recall_score(gold, predicted), abs=1e-12)
    assert ours["f1"] == pytest.approx(f1_score(gold, predicted), abs=1e-12)


def test_our_scorer_agrees_with_seqeval_on_conll_dev(shared_data):
    gold = [json.loads(line)["tags"] for line in open(shared_data / "conll2003" / "dev.jsonl", encoding="utf-8")]
    rng = random.Random(0)
    for noise in (0.0, 0.05, 0.3):  # a perfect tagger, a good one, a poor one (with ill-formed BIO among its errors)
        predicted = [[rng.choice(TAGS) if rng.random() < noise else tag for tag in row] for row in gold]
        _agree(predicted, gold)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from(TAGS), st.sampled_from(TAGS)), min_size=1, max_size=12),
                min_size=1, max_size=6))
def test_our_scorer_agrees_with_seqeval_on_any_tags(rows):
    predicted = [[p for p, _ in row] for row in rows]
    gold = [[g for _, g in row] for row in rows]
    if not any(tag != "O" for row in gold + predicted for tag in row):
        return  # no entity anywhere: seqeval warns and says 0, as we do
    _agree(predicted, gold)
