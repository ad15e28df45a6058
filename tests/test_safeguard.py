"""Issue 33: domain adaptation that never hurts on data it has not seen. The safeguard judges an adapted classifier
against the source-only one by label-free criteria and keeps the adapted one only when they say it is better;
self-training says what each round kept, and stops when its labels drift."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from conftest import classification_recipe, write_jsonl

from peft_adapt import parse_recipe, train_domain
from peft_adapt.adaptation.features import tokenize_target
from peft_adapt.adaptation.selection import (
    Outputs,
    choose,
    choose_among,
    criteria,
    dev_risk,
    prior_gap,
    snd,
    source_drop_p,
)
from peft_adapt.adaptation.self_training import SelfTrainingSpec, drift
from peft_adapt.training.safeguard import judge


def _target(tmp_path, labels: str):
    """Unlabeled-looking target text in other words than the source's; `labels` true, flipped or none."""
    rows = []
    for i in range(48):
        row = {"text": " ".join(["superb excellent fine", "useless terrible awful"][i % 2] for _ in range(2))}
        if labels != "none":
            row["label"] = i % 2 if labels == "true" else 1 - i % 2
        rows.append(row)
    return write_jsonl(tmp_path / f"target-{labels}.jsonl", rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert, sentiment_file):
    """A source-only classifier trained well (30 steps) and one barely trained (1 step), unquantized."""
    root = tmp_path_factory.mktemp("safeguard")
    models = {}
    for name, steps in (("well", 30), ("barely", 1)):
        data = classification_recipe(tiny_bert, sentiment_file, max_steps=steps)
        data["task"]["pooling"] = "mean"
        models[name] = train_domain(parse_recipe(data), "sentiment", root / name)
    return models


def _rows(result, tmp_path):
    tokenizer = result.backbone.tokenizer
    texts = [json.loads(line)["text"] for line in _target(tmp_path, "none").read_text().splitlines()]
    return result.data.eval, tokenize_target(texts, tokenizer, 32), tokenizer.pad_token_id


def test_the_safeguard_rejects_a_classifier_made_worse_and_keeps_one_that_is_better(trained, tmp_path):
    well, barely = trained["well"], trained["barely"]
    source, target, pad = _rows(well, tmp_path)
    flipped = copy.deepcopy(well.model)
    with torch.no_grad():  # every prediction flipped: what confident, wrong pseudo-labels teach, made certain
        flipped.classifier.weight.copy_(flipped.classifier.weight.flip(0))
        flipped.classifier.bias.copy_(flipped.classifier.bias.flip(0))
    worse = judge(flipped, well.model, source, target, pad)
    assert worse.selected == "source_only" and "accuracy fell" in worse.why, worse
    better = judge(well.model, barely.model, source, target, pad)
    assert better.selected == "adapted", better
    assert better.criteria["adapted"]["dev_risk"] < better.criteria["source_only"]["dev_risk"]
    for found in better.criteria.values():  # the mean target prediction the diversity is read from
        shares = torch.tensor(found["target_shares"])
        assert shares.sum() == pytest.approx(1, abs=1e-3)
        entropy = -(shares * shares.clamp_min(1e-12).log()).sum() / math.log(len(shares))
        assert float(entropy) == pytest.approx(found["target_diversity"], abs=1e-3)


def test_the_decision_errs_towards_source_only():
    base = {"dev_risk": 0.5, "source_accuracy": 0.9, "target_diversity": 0.9, "source_drop_p": 0.5, "prior_gap": 0.05}
    assert choose(base | {"dev_risk": 0.4}, base)[0] == "adapted"
    assert choose(base | {"dev_risk": 0.5}, base)[0] == "source_only"  # a tie keeps what never hurts
    assert choose(base | {"dev_risk": 0.1, "source_accuracy": 0.8, "source_drop_p": 0.01}, base)[0] == "source_only"
    assert choose(base | {"dev_risk": 0.1, "target_diversity": 0.2}, base)[0] == "source_only"  # collapsed
    # a lower DEV risk does not outweigh target predictions leaning farther from the source's class shares
    leaning = choose(base | {"dev_risk": 0.1, "prior_gap": 0.08}, base)
    assert leaning[0] == "source_only" and "class shares: 0.080" in leaning[1]
    assert choose(base | {"dev_risk": 0.1, "prior_gap": 0.01}, base)[0] == "adapted"  # nearer: the DEV decides
    # the DEV read is the weighted error in the base model's space when both report it, whatever the cross-entropy says
    errors = {"dev_error_base": 0.2, "dev_error": 0.2}
    sharper = base | {"dev_risk": 0.6, "dev_error_base": 0.15, "dev_error": 0.25}
    kept = choose(sharper, base | errors)
    assert kept[0] == "adapted" and "dev_error_base" in kept[1], kept
    assert choose(sharper | {"dev_error_base": 0.2}, base | errors)[0] == "source_only"  # a tie keeps source-only
    # without base features (no adapter switch) the errors in the model's own space decide
    own = {k: v for k, v in sharper.items() if k != "dev_error_base"}
    assert choose(own, base | errors)[0] == "source_only"
    assert choose(own | {"dev_error": 0.1}, base | errors)[0] == "adapted"
    # SND is reported, not decided on: it rewards density, and a collapse onto one class is the densest of all
    clusters = torch.tensor([[0.99, 0.01]] * 5 + [[0.01, 0.99]] * 5)
    assert snd(clusters) == pytest.approx(math.log(4), abs=1e-3)  # each row's 4 cluster-mates, equally near
    assert snd(torch.tensor([[0.99, 0.01]] * 10)) == pytest.approx(math.log(9), abs=1e-3)


def test_the_prior_gap_is_the_share_of_target_predictions_off_the_source_class_shares():
    labels = torch.tensor([0] * 6 + [1] * 4)  # source held-out shares 0.6 / 0.4
    assert prior_gap(torch.tensor([0.75, 0.25]), labels, 2) == pytest.approx(0.15)
    assert prior_gap(torch.tensor([0.6, 0.4]), labels, 2) == pytest.approx(0.0)
    assert prior_gap(torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0, 1, 2, 2]), 3) == pytest.approx(0.05)
    # the shares come from every labelled source row when given (train + held-out), not the held-out rows alone
    target = torch.tensor([[0.7, 0.3], [0.3, 0.7]])  # mean prediction 0.5 / 0.5
    held_out = Outputs(target, torch.tensor([0, 0]), torch.eye(2), target, torch.eye(2))
    assert criteria(held_out)["prior_gap"] == pytest.approx(0.5)  # held-out rows all class 0
    every = Outputs(target, torch.tensor([0, 0]), torch.eye(2), target, torch.eye(2), class_labels=labels)
    assert criteria(every)["prior_gap"] == pytest.approx(0.1)  # shares 0.6 / 0.4


def test_dev_weighs_each_source_row_by_the_weights_given_and_its_zero_one_variant_counts_errors():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])  # labels all 0: rows 3 and 4 wrong
    out = Outputs(probs, torch.zeros(4, dtype=torch.long), torch.eye(4), probs, torch.eye(4))
    flat = torch.ones(4)
    assert dev_risk(out, weights=flat, zero_one=True) == pytest.approx(0.5)  # equal weights: the error rate
    assert dev_risk(out, weights=flat) == pytest.approx(-torch.tensor([0.9, 0.6, 0.3, 0.2]).log().mean().item())
    # weight on the wrong rows raises the estimate: 3x on rows 3-4 (weights scaled to mean 1, control variate on)
    tilted = torch.tensor([0.5, 0.5, 1.5, 1.5])
    assert dev_risk(out, weights=tilted, zero_one=True) > 0.5
    # criteria report the variants; the base-feature ones only when the base model's weights are given
    assert criteria(out)["dev_error"] == pytest.approx(dev_risk(out, zero_one=True))
    assert "dev_base" not in criteria(out)
    found = criteria(out, base_weights=tilted)
    assert found["dev_base"] == pytest.approx(dev_risk(out, weights=tilted))
    assert found["dev_error_base"] == pytest.approx(dev_risk(out, weights=tilted, zero_one=True))


def _outputs(right: list[bool]) -> Outputs:
    """Two-class outputs whose source predictions are right exactly on the rows marked True."""
    labels = torch.zeros(len(right), dtype=torch.long)
    probs = torch.tensor([[0.9, 0.1] if r else [0.1, 0.9] for r in right])
    return Outputs(probs, labels, torch.zeros(len(right), 4), probs, torch.zeros(len(right), 4))


def test_a_source_drop_counts_only_beyond_chance():
    """The sign test on the rows the two models disagree on: 3 rows lost of 80 is noise, 10 lost and none won is
    not (p = 2**-10), and rows won back offset rows lost."""
    before = _outputs([True] * 72 + [False] * 8)
    assert source_drop_p(_outputs([False] * 3 + [True] * 69 + [False] * 8), before) == pytest.approx(1 / 8)
    assert source_drop_p(_outputs([False] * 10 + [True] * 62 + [False] * 8), before) == pytest.approx(2**-10)
    assert source_drop_p(_outputs([False] * 10 + [True] * 62 + [True] * 8), before) == pytest.approx(0.407, abs=1e-3)
    assert source_drop_p(before, before) == 1.0  # no row differs: nothing to tell
    base = {"dev_risk": 0.5, "source_accuracy": 0.9, "target_diversity": 0.9, "prior_gap": 0.05}
    noise = base | {"dev_risk": 0.4, "source_accuracy": 0.8625, "source_drop_p": 1 / 8}
    assert choose(noise, base)[0] == "adapted"  # 3 rows: the rule that fell back at a 0.01 drop now keeps it
    assert choose(noise | {"source_drop_p": 2**-10}, base)[0] == "source_only"


def test_a_guarded_run_records_its_choice_and_reads_no_target_label(tmp_path, tiny_bert, sentiment_file, capsys,
                                                                   caplog):
    """Target labels true, flipped or absent: the same criteria, the same choice, the same adapter."""
    decisions = []
    for labels in ("true", "flipped", "none"):
        data = classification_recipe(tiny_bert, sentiment_file, max_steps=8)
        data["domain_adaptation"] = {"method": "mmd", "target": str(_target(tmp_path, labels))}
        with caplog.at_level(logging.WARNING):
            result = train_domain(parse_recipe(data), "sentiment", tmp_path / labels)
        record = json.loads((result.out_dir / "metrics.json").read_text())["domain_adaptation"]
        assert record["selected"] in ("adapted", "source_only") and set(record["criteria"]) == {"adapted", "source_only"}
        decisions.append(record)
        assert not (tmp_path / labels / ".sentiment.source-only").exists()  # its scratch folder is gone
    assert decisions[0] == decisions[1] == decisions[2]
    said = capsys.readouterr().out + caplog.text  # kept: a printed line; fell back: a warning
    assert said.count("sentiment: safeguard ") == 3 and decisions[0]["why"] in said


def test_a_registered_source_only_adapter_is_judged_against_instead_of_training_it_again(tmp_path, tiny_bert,
                                                                                       sentiment_file):
    """`source_only: REF`: the same recipe and seed registered without adaptation gives the judgement the trained
    source-only gives, with no source-only run; an adapter of other labels is refused by name."""
    from peft_adapt import Registry

    registry = Registry(tmp_path / "reg")
    data = classification_recipe(tiny_bert, sentiment_file, max_steps=8)
    registry.add(train_domain(parse_recipe(data), "sentiment", tmp_path / "plain").out_dir, name="plain")
    adapted = data | {"domain_adaptation": {"method": "mmd", "target": str(_target(tmp_path, "none"))}}
    trained = train_domain(parse_recipe(adapted), "sentiment", tmp_path / "trained")
    adapted["domain_adaptation"]["source_only"] = "plain"
    reused = train_domain(parse_recipe(adapted), "sentiment", tmp_path / "reused", registry=registry)
    assert not (tmp_path / "reused" / ".sentiment.source-only").exists()
    first, second = (r.metrics["domain_adaptation"] for r in (trained, reused))
    assert second["criteria"] == first["criteria"] and second["selected"] == first["selected"]
    assert second["source_only_metrics"] == first["source_only_metrics"]

    other = write_jsonl(tmp_path / "three.jsonl", [{"text": f"row {i}", "label": ["a", "b", "c"][i % 3]}
                                                    for i in range(30)])
    three = classification_recipe(tiny_bert, other, max_steps=1) | {"domains": {"three": {"train": str(other)}}}
    registry.add(train_domain(parse_recipe(three), "three", tmp_path / "three").out_dir, name="three")
    adapted["domain_adaptation"]["source_only"] = "three"
    with pytest.raises(Exception, match="domain_adaptation.source_only: three"):
        train_domain(parse_recipe(adapted), "sentiment", tmp_path / "refused", registry=registry)


def test_self_training_says_what_each_round_kept_and_warns_when_it_kept_nothing(tmp_path, tiny_bert, sentiment_file,
                                                                                capsys, caplog):
    data = classification_recipe(tiny_bert, sentiment_file, max_steps=6)
    data["domain_adaptation"] = {"method": "none", "target": str(_target(tmp_path, "none")), "safeguard": False,
                                 "self_training": {"rounds": 2, "threshold": 0.999999, "max_class_share": 1.0,
                                                   "min_agreement": 0.0}}
    with caplog.at_level(logging.WARNING):
        result = train_domain(parse_recipe(data), "sentiment", tmp_path)
    out = capsys.readouterr().out
    assert "self-training round 1/2 at step 2: kept 0 of 48 target rows" in out and "round 2/2" in out
    assert "kept no target row" in caplog.text and "the adapter equals source-only" in caplog.text
    assert [r["selected"] for r in result.metrics["self_training"]] == [0, 0]


def test_self_training_stops_when_its_labels_drift_or_collapse():
    spec = SelfTrainingSpec()
    reference = torch.tensor([0, 1] * 10)
    assert drift(reference.clone(), reference, 2, spec) == (1.0, None)
    flipped = 1 - reference
    agreement, why = drift(flipped, reference, 2, spec)
    assert agreement == 0.0 and "min_agreement" in why
    collapsed = torch.zeros(20, dtype=torch.long)
    _, why = drift(collapsed, torch.zeros(20, dtype=torch.long), 2, spec)
    assert "max_class_share" in why


def test_select_auto_ranks_a_small_grid_by_the_same_criteria_and_saves_the_recipe_it_kept(tmp_path, tiny_bert,
                                                                                          sentiment_file):
    data = classification_recipe(tiny_bert, sentiment_file, max_steps=8)
    data["domain_adaptation"] = {"method": "mmd", "target": str(_target(tmp_path, "none")), "weight": 0.1,
                                 "select": "auto"}
    result = train_domain(parse_recipe(data), "sentiment", tmp_path / "out")
    record = result.metrics["domain_adaptation"]
    assert set(record["criteria"]) == {"adapted", "weight=0.01", "weight=1", "source_only"}
    ranked = {k: v for k, v in record["criteria"].items() if k != "source_only"}
    # the recorded choice is the recorded criteria's: the lowest DEV risk of those the guards let through
    assert choose_among(ranked, record["criteria"]["source_only"])[0] == record["selected"]
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    weight = {"adapted": 0.1, "weight=0.01": 0.01, "weight=1": 1.0}.get(record["selected"], 0.1)
    assert manifest["recipe"]["domain_adaptation"]["weight"] == pytest.approx(weight)
    with pytest.raises(Exception, match="select: auto chooses by the safeguard's criteria"):
        parse_recipe(data | {"domain_adaptation": data["domain_adaptation"] | {"safeguard": False}})


def test_a_large_target_is_judged_on_one_sample_shared_by_every_model(trained, tmp_path, monkeypatch):
    """SND is rows x rows: the criteria read at most JUDGE_ROWS rows of each side, the same sample for each model."""
    from peft_adapt.training import safeguard

    well, barely = trained["well"], trained["barely"]
    source, target, pad = _rows(well, tmp_path)
    monkeypatch.setattr(safeguard, "JUDGE_ROWS", 16)
    capped = judge(well.model, barely.model, source, target, pad)
    sampled_source, sampled_target = safeguard.sample_rows(source), safeguard.sample_rows(target)
    assert len(target) == 48 and len(sampled_target) == 16 and len(set(map(id, sampled_target))) == 16
    assert len(sampled_source) == min(16, len(source))
    direct = judge(well.model, barely.model, sampled_source, sampled_target, pad)
    assert capped.criteria == direct.criteria and capped.selected == direct.selected


def test_reverse_validation_reads_each_model_through_the_base_features(trained, tmp_path):
    """A probe on the base model's target features, taught by a model's target labels, labels the source as well as
    those labels are right: the flipped model's probe gets the source wrong, the well-trained one's right."""
    well = trained["well"]
    source, _, pad = _rows(well, tmp_path)
    # the target: the source's own held-out text, unlabeled (a tiny random base carries no sentiment from one
    # vocabulary to another, so the probe is read where the base features can tell the classes apart at all)
    target = [{k: r[k] for k in ("input_ids", "attention_mask")} for r in source]
    flipped = copy.deepcopy(well.model)
    with torch.no_grad():
        flipped.classifier.weight.copy_(flipped.classifier.weight.flip(0))
        flipped.classifier.bias.copy_(flipped.classifier.bias.flip(0))
    found = judge(flipped, well.model, source, target, pad).criteria
    good, bad = found["source_only"]["reverse_accuracy"], found["adapted"]["reverse_accuracy"]
    assert good > 0.5 > bad and good + bad == pytest.approx(1.0), found
    # DEV read in the base model's space: the same weights for both, so the flipped head's errors cost more
    assert found["adapted"]["dev_error_base"] > found["source_only"]["dev_error_base"], found
