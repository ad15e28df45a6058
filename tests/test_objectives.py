"""Domain-adaptation objectives and token classification."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import causal_recipe, classification_recipe, write_jsonl

from peft_adapt import parse_recipe, train_domain
from peft_adapt.adaptation.features import read_target_texts
from peft_adapt.adaptation.losses import coral_loss, dann_lambda, mmd_loss, reverse_gradient
from peft_adapt.adaptation.self_training import round_starts, select_pseudo_labels
from peft_adapt.data import IGNORE_INDEX, Example, tokenize_token_classification
from peft_adapt.training.metrics import entity_metrics, entity_spans


def test_gradient_reversal_flips_and_scales_gradients_exactly():
    x = torch.randn(5, 3, requires_grad=True)
    upstream = torch.randn(5, 3)
    y = reverse_gradient(x, 0.37)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.equal(x.grad, -0.37 * upstream)


def test_dann_lambda_rises_from_0_to_nearly_1():
    values = [dann_lambda(p / 10) for p in range(11)]
    assert values[0] == 0.0 and values[-1] > 0.99
    assert all(a < b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("loss", [coral_loss, mmd_loss], ids=["coral", "mmd"])
def test_alignment_losses_are_zero_for_identical_batches_and_grow_with_a_shift(loss):
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(32, 8, generator=generator)
    assert abs(float(loss(source, source.clone()))) < 1e-6
    other = torch.randn(32, 8, generator=generator)
    # a shift of the target's distribution: CORAL sees covariance (scale), MMD sees any difference
    shifted = [float(loss(source, other * (1 + s) + s)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(shifted, shifted[1:])), shifted


def _target(tmp_path, name, with_labels):
    rows = []
    for i in range(40):
        text = " ".join(["superb excellent", "useless terrible"][i % 2] for _ in range(3))
        row = {"text": text}
        if with_labels == "garbage":
            row["label"] = {"not": "a label"}  # unreadable as a label: reading it would fail
        elif with_labels == "flipped":
            row["label"] = 1 - i % 2
        elif with_labels == "true":
            row["label"] = i % 2
        rows.append(row)
    return write_jsonl(tmp_path / name, rows)


def test_only_the_target_text_is_read(tmp_path):
    path = _target(tmp_path, "t.jsonl", "garbage")
    texts = read_target_texts(path)
    assert len(texts) == 40 and texts[0].startswith("superb")


SELF_TRAINING = {"rounds": 2, "threshold": 0.5, "balance": False,  # every row is confident enough: all are used
                 "agree": False, "min_agreement": 0.0, "max_class_share": 1.0}


@pytest.mark.parametrize("objective, self_training", [("dann", False), ("mmd", False), ("none", True), ("mmd", True)],
                         ids=["dann", "mmd", "self_training", "mmd+self_training"])
def test_target_labels_cannot_reach_the_loss(tmp_path, tiny_bert, sentiment_file, objective, self_training):
    """Training with the target's true labels, flipped labels or none gives bit-identical adapters."""
    from safetensors.torch import load_file

    weights = []
    for labels in ("true", "flipped", "none"):
        data = classification_recipe(tiny_bert, sentiment_file, max_steps=6, logging_steps=1)
        data["domain_adaptation"] = {"method": objective, "target": str(_target(tmp_path, f"{labels}.jsonl", labels)),
                                     "safeguard": False}  # the adapted adapter itself is compared
        if self_training:
            data["domain_adaptation"]["self_training"] = SELF_TRAINING
        result = train_domain(parse_recipe(data), "sentiment", tmp_path / labels)
        weights.append(load_file(result.out_dir / "adapter_model.safetensors"))
        if self_training:  # the pseudo-labelled rows did train: two rounds, all 40 target rows, a logged loss
            assert [r["step"] for r in result.metrics["self_training"]] == round_starts(6, 2) == [2, 4]
            assert all(r["selected"] == 40 for r in result.metrics["self_training"])
            history = json.loads((result.out_dir / "log_history.json").read_text())
            # labelled after 2 updates: the pseudo-labelled loss joins from the third step on
            assert [e["step"] for e in history if "pseudo_labelled_loss" in e] == [3, 4, 5, 6]
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])


def test_pseudo_labels_keep_confident_rows_balanced_per_class():
    probabilities = torch.tensor([
        [0.95, 0.05], [0.99, 0.01], [0.97, 0.03], [0.40, 0.60], [0.08, 0.92], [0.5, 0.5], [0.2, 0.8]])
    assert select_pseudo_labels(probabilities, 0.9, balance=False) == ([0, 1, 2, 4], [0, 0, 0, 1])
    # balanced: class 1 has one confident row (4), so class 0 keeps its single most confident (1)
    assert select_pseudo_labels(probabilities, 0.9, balance=True) == ([1, 4], [0, 1])
    assert select_pseudo_labels(probabilities, 0.75, balance=True) == ([1, 2, 4, 6], [0, 0, 1, 1])
    # a class with no confident row: balancing teaches nothing rather than one class only
    assert select_pseudo_labels(probabilities, 0.96, balance=True) == ([], [])


def test_flexmatch_thresholds_lower_the_bar_for_the_class_the_model_is_unsure_about():
    from peft_adapt.adaptation.self_training import class_thresholds

    probabilities = torch.tensor([
        [0.95, 0.05], [0.99, 0.01], [0.97, 0.03], [0.40, 0.60], [0.08, 0.92], [0.5, 0.5], [0.2, 0.8]])
    assert torch.allclose(class_thresholds(probabilities, 0.9), torch.tensor([0.9, 0.9]))
    # 3 confident rows of class 0, 1 of class 1, 3 unsure: b = (3/3, 1/3); threshold * b / (2 - b)
    found = class_thresholds(probabilities, 0.9, "flexmatch")
    assert torch.allclose(found, torch.tensor([0.9, 0.9 * (1 / 3) / (2 - 1 / 3)]))
    rows, labels = select_pseudo_labels(probabilities, found, balance=False)
    assert (rows, labels) == ([0, 1, 2, 3, 4, 6], [0, 0, 0, 1, 1, 1])  # class 1's 0.6 and 0.8 now count
    # no class confident yet: every class's bar drops alike, and the fixed bar keeps nothing
    unsure = torch.tensor([[0.7, 0.3], [0.35, 0.65], [0.6, 0.4]])
    assert select_pseudo_labels(unsure, 0.9, balance=True) == ([], [])
    assert class_thresholds(unsure, 0.9, "flexmatch").tolist() == [0.0, 0.0]


def test_self_training_that_finds_no_confident_row_changes_nothing(tmp_path, tiny_bert, sentiment_file):
    from safetensors.torch import load_file

    weights = []
    for setting in (None, {"rounds": 3, "threshold": 0.999999, "max_class_share": 1.0, "min_agreement": 0.0}):
        data = classification_recipe(tiny_bert, sentiment_file, max_steps=6)
        if setting:
            data["domain_adaptation"] = {"method": "none", "target": str(_target(tmp_path, "t.jsonl", "none")),
                                         "self_training": setting, "safeguard": False}
        result = train_domain(parse_recipe(data), "sentiment", tmp_path / str(bool(setting)))
        weights.append(load_file(result.out_dir / "adapter_model.safetensors"))
    assert [r["selected"] for r in result.metrics["self_training"]] == [0, 0, 0]  # labelled, nothing confident
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])


@pytest.mark.parametrize("change, message", [
    ({"method": "none"}, "method none aligns nothing"),
    ({"self_training": {"rounds": 0}}, "rounds"),
    ({"self_training": {"threshold": 1.0}}, "threshold"),
])
def test_self_training_settings_are_checked(tiny_bert, sentiment_file, change, message):
    data = classification_recipe(tiny_bert, sentiment_file, max_steps=6)
    data["domain_adaptation"] = {"method": "mmd", "target": str(sentiment_file)} | change
    with pytest.raises(Exception, match=message):
        parse_recipe(data)


def test_self_training_needs_a_classifier(tiny_llama, docs_file):
    data = causal_recipe(tiny_llama, docs_file, "nf4", max_steps=6)
    data["domain_adaptation"] = {"method": "none", "target": str(docs_file), "self_training": {}}
    with pytest.raises(Exception, match="self_training labels whole texts"):
        parse_recipe(data)


@pytest.mark.parametrize("method", ["dann", "coral", "mmd"])
@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_each_objective_trains_on_every_quantization(tmp_path, tiny_bert, sentiment_file, method, quantization):
    data = classification_recipe(tiny_bert, sentiment_file, quantization, max_steps=8, logging_steps=2)
    data["task"]["pooling"] = "mean"
    data["domain_adaptation"] = {"method": method, "target": str(_target(tmp_path, "t.jsonl", "true")), "weight": 1.0,
                                 "safeguard": False}
    result = train_domain(parse_recipe(data), "sentiment", tmp_path)
    history = json.loads((result.out_dir / "log_history.json").read_text())
    terms = [e[f"{method}_loss"] for e in history if f"{method}_loss" in e]
    assert terms and all(t == t and t >= 0 for t in terms)  # logged, finite (not NaN), non-negative
    losses = [e["loss"] for e in history if "loss" in e]
    assert all(loss == loss for loss in losses)


def test_an_objective_trains_a_causal_lm_too(tmp_path, tiny_llama, docs_file):
    data = causal_recipe(tiny_llama, docs_file, "nf4", max_steps=6, logging_steps=2)
    data["domain_adaptation"] = {"method": "coral", "target": str(docs_file), "weight": 1.0}
    result = train_domain(parse_recipe(data), "docs", tmp_path)
    assert any("coral_loss" in e for e in json.loads((result.out_dir / "log_history.json").read_text()))


def test_dann_trains_its_domain_classifier(tmp_path, tiny_bert, sentiment_file, monkeypatch):
    from peft_adapt.training import adapting

    seen = {}
    original = adapting.DomainAdaptationTrainer.create_optimizer

    def spy(self, *args, **kwargs):
        optimizer = original(self, *args, **kwargs)
        seen["trainer"], seen["before"] = self, [p.detach().clone() for p in self.alignment.classifier.parameters()]
        return optimizer

    monkeypatch.setattr(adapting.DomainAdaptationTrainer, "create_optimizer", spy)
    data = classification_recipe(tiny_bert, sentiment_file, max_steps=5)
    data["domain_adaptation"] = {"method": "dann", "target": str(_target(tmp_path, "t.jsonl", "none")), "safeguard": False}
    train_domain(parse_recipe(data), "sentiment", tmp_path)
    after = list(seen["trainer"].alignment.classifier.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, seen["before"]))


# ---- token classification


def test_word_tags_go_on_the_first_sub_token_only(tiny_bert):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    words = ["Supercalifragilistic", "visited", "Llanfairpwllgwyngyll", "."]
    tags = [1, 0, 2, 0]
    (feature,) = tokenize_token_classification([Example(1, words=words, tags=tags)], tokenizer, 128)
    pieces = [len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words]
    assert pieces[0] > 1 and pieces[2] > 1  # the test needs words split into several tokens
    expected = [IGNORE_INDEX]  # [CLS]
    for tag, n in zip(tags, pieces):
        expected += [tag] + [IGNORE_INDEX] * (n - 1)
    expected += [IGNORE_INDEX]  # [SEP]
    assert feature["labels"] == expected
    assert [w for w in feature["word_ids"] if w >= 0] == [0, 1, 2, 3]


def test_entity_spans_follow_conlleval():
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
    assert entity_spans(["I-ORG", "I-ORG", "B-ORG"]) == {("ORG", 0, 1), ("ORG", 2, 2)}  # I- starts an entity
    assert entity_spans(["B-PER", "I-LOC"]) == {("PER", 0, 0), ("LOC", 1, 1)}
    scores = entity_metrics([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-ORG"]])
    assert scores == {"precision": 0.5, "recall": 0.5, "f1": 0.5}


@pytest.mark.parametrize("setup", ["lora-nf4", "head-only", "full"])
def test_token_classification_trains_and_scores_entities(tmp_path, tiny_bert, setup):
    rows = []
    for i in range(64):
        name = ["Alice", "Bob", "Carol", "Dave"][i % 4]
        place = ["Paris", "Rome", "Oslo", "Lima"][i // 4 % 4]
        rows.append({"tokens": [name, "lives", "in", place, "."], "tags": ["B-PER", "O", "O", "B-LOC", "O"]})
    train = write_jsonl(tmp_path / "ner.jsonl", rows)
    data = {
        "base": {"model": str(tiny_bert), "quantization": "nf4" if setup == "lora-nf4" else "none"},
        "task": {"type": "token_classification", "max_length": 32},
        "training": {"max_steps": 40, "batch_size": 16, "learning_rate": 1e-2, "seed": 0},
        "domains": {"ner": {"train": str(train)}},
    }
    if setup == "lora-nf4":
        data["adapter"] = {"r": 8, "alpha": 16}
    else:
        data["freeze"] = "all" if setup == "head-only" else "none"
        data["training"]["learning_rate"] = 1e-2 if setup == "head-only" else 1e-3
    result = train_domain(parse_recipe(data), "ner", tmp_path / setup)
    scores = result.metrics["eval"]
    assert set(scores) >= {"precision", "recall", "f1", "word_accuracy"}
    assert scores["word_accuracy"] > 0.8, scores  # the tags are learnable from the words
    assert result.manifest.labels[0] == "O"


def test_dann_confusion_trains_the_classifier_and_the_features_each_on_its_own_term():
    from peft_adapt.adaptation.losses import DomainClassifier, dann_confusion_loss

    torch.manual_seed(0)
    classifier = DomainClassifier(8, 16)
    source, target = torch.randn(6, 8, requires_grad=True), (torch.randn(6, 8) + 1).requires_grad_()
    dann_confusion_loss(source, target, classifier, lam=0.3).backward()
    # the classifier learns from its own cross-entropy only
    reference = DomainClassifier(8, 16)
    reference.load_state_dict(classifier.state_dict())
    labels = torch.cat([torch.zeros(6), torch.ones(6)])
    torch.nn.functional.binary_cross_entropy_with_logits(
        reference(torch.cat([source, target]).detach()), labels).backward()
    for mine, theirs in zip(classifier.parameters(), reference.parameters()):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-7)
    # the features learn lam x the confusion term only, which is 0 (its floor) when the classifier says 1/2
    features = torch.cat([source, target]).detach().requires_grad_()
    fixed = DomainClassifier(8, 16)
    fixed.load_state_dict(classifier.state_dict())
    confusion = torch.nn.functional.binary_cross_entropy_with_logits(fixed(features), torch.full((12,), 0.5))
    (0.3 * confusion).backward()
    assert torch.allclose(torch.cat([source.grad, target.grad]), features.grad, atol=1e-7)
    undecided = DomainClassifier(8, 16)
    torch.nn.init.zeros_(undecided.net[-1].weight)
    torch.nn.init.zeros_(undecided.net[-1].bias)
    value = dann_confusion_loss(source, target, undecided, lam=1.0)
    assert abs(float(value) - math.log(2)) < 1e-6  # the classifier's own loss at 1/2 (log 2), a confusion term of 0
