"""ADDA: a source adapter and head from the source's labels, then a target adapter trained adversarially against a
domain discriminator and served with the source's head."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import classification_recipe, write_jsonl
from safetensors.torch import load_file

from peft_adapt import AdapterRuntime, Registry, UserInputError, parse_recipe, train_domain, train_recipe
from peft_adapt.adaptation.adda import AddaPhase
from peft_adapt.data import pad_batch
from peft_adapt.formats import verify_checksums


def _target(tmp_path):
    rows = [{"text": " ".join(["superb splendid", "dreadful rotten"][i % 2] for _ in range(4)), "label": i % 2}
            for i in range(40)]
    return write_jsonl(tmp_path / "target.jsonl", rows)


def _adda_recipe(tiny_bert, sentiment_file, target, **adaptation):
    data = classification_recipe(tiny_bert, sentiment_file, max_steps=6)
    data["domain_adaptation"] = {"method": "adda", "target": str(target), "adda_steps": 6,
                                 "adda_learning_rate": 1e-3} | adaptation
    return data


def test_adda_trains_a_target_adapter_and_leaves_the_source_alone(tmp_path, tiny_bert, sentiment_file):
    target = _target(tmp_path)
    registry = Registry(tmp_path / "reg")
    results = train_recipe(parse_recipe(_adda_recipe(tiny_bert, sentiment_file, target, safeguard=False)),
                           tmp_path / "out", registry=registry)
    source, adapted = results[0], results[0].adapted
    assert adapted is not None and {e.name for e in registry.list()} == {"t-sentiment", "t-sentiment-adda"}
    plain = train_domain(parse_recipe(classification_recipe(tiny_bert, sentiment_file, max_steps=6)), "sentiment",
                         tmp_path / "plain")
    source_weights = load_file(str(source.out_dir / "adapter_model.safetensors"))
    plain_weights = load_file(str(plain.out_dir / "adapter_model.safetensors"))
    target_weights = load_file(str(adapted.out_dir / "adapter_model.safetensors"))
    # the source phase is plain training, and the target phase changed nothing of what it saved
    assert source_weights.keys() == plain_weights.keys()
    assert all(torch.equal(source_weights[k], plain_weights[k]) for k in source_weights)
    assert verify_checksums(source.out_dir, source.manifest) == []
    heads = [k for k in source_weights if "classifier" in k]
    assert heads and all(torch.equal(source_weights[k], target_weights[k]) for k in heads)  # the source head, frozen
    moved = [k for k in source_weights if "lora_" in k and not torch.equal(source_weights[k], target_weights[k])]
    assert moved  # the target adapter moved away from the source adapter it started from
    history = json.loads((adapted.out_dir / "log_history.json").read_text())
    assert len(history) == 6 and all("discriminator_loss" in e and "loss" in e for e in history)
    runtime = AdapterRuntime(str(tiny_bert), task="classification", quantization="none", registry=registry)
    assert runtime.classify(["superb splendid"], "t-sentiment-adda")[0]["adapter"] == "t-sentiment-adda"


def test_a_guarded_phase_is_judged_against_its_source_adapter_and_registered_only_if_better(tmp_path, tiny_bert,
                                                                                           sentiment_file):
    registry = Registry(tmp_path / "reg")
    results = train_recipe(parse_recipe(_adda_recipe(tiny_bert, sentiment_file, _target(tmp_path))), tmp_path / "out",
                           registry=registry)
    record = results[0].adapted.metrics["domain_adaptation"]
    assert record["method"] == "adda" and set(record["criteria"]) == {"adapted", "source_only"}
    saved = json.loads((results[0].adapted.out_dir / "metrics.json").read_text())["domain_adaptation"]
    assert saved["selected"] == record["selected"]
    names = {e.name for e in registry.list()}
    assert "t-sentiment" in names and ("t-sentiment-adda" in names) == (record["selected"] == "adapted")


def test_the_two_players_losses_move_in_opposite_directions(tmp_path, tiny_bert, sentiment_file):
    from peft_adapt.adaptation.adda import source_features

    result = train_domain(parse_recipe(classification_recipe(tiny_bert, sentiment_file, max_steps=4)), "sentiment",
                          tmp_path)
    model, pad = result.model, result.backbone.tokenizer.pad_token_id
    source = source_features(model, result.data.train[:16], "classification", pad, torch.device("cpu"))
    tokenizer = result.backbone.tokenizer
    batch = pad_batch([{k: v for k, v in tokenizer(text).items() if k in ("input_ids", "attention_mask")}
                       for text in ["superb splendid superb", "dreadful rotten dreadful"] * 8], pad)
    phase = AddaPhase(model, "classification", model.config.hidden_size, 32, learning_rate=1e-3, seed=0)
    model.eval()  # no dropout: the same features before and after each step but for what the step changed

    def losses():
        with torch.no_grad():
            return phase.losses(source, phase.target_features(batch))

    before = losses()
    phase.discriminator_step(source, phase.target_features(batch))
    after_d = losses()
    assert after_d.discriminator < before.discriminator and after_d.generator > before.generator
    phase.generator_step(batch)
    after_g = losses()
    assert after_g.generator < after_d.generator and after_g.discriminator > after_d.discriminator


def test_adda_settings_are_checked(tmp_path, tiny_bert, tiny_llama, sentiment_file, docs_file):
    from conftest import causal_recipe

    target = _target(tmp_path)
    with pytest.raises(UserInputError, match="one or the other"):
        parse_recipe(_adda_recipe(tiny_bert, sentiment_file, target,
                                  self_training={"rounds": 2, "threshold": 0.9}))
    data = causal_recipe(tiny_llama, docs_file)
    data["domain_adaptation"] = {"method": "adda", "target": str(docs_file)}
    with pytest.raises(UserInputError, match="adapts the source.s classifier"):
        parse_recipe(data)


def test_the_source_anchor_keeps_the_target_adapter_classifying_the_source(tmp_path, tiny_bert, sentiment_file):
    """adda_source_weight: the source rows' classification loss joins the GAN loss. Run from the same start with the
    same batches, the anchored target adapter keeps a lower source loss than Tzeng's unanchored one."""
    import copy

    from peft_adapt.adaptation.adda import source_features

    result = train_domain(parse_recipe(classification_recipe(tiny_bert, sentiment_file, max_steps=8)), "sentiment",
                          tmp_path)
    pad = result.backbone.tokenizer.pad_token_id
    source_rows = pad_batch(result.data.train[:32], pad)
    tokenizer = result.backbone.tokenizer
    target = pad_batch([{k: v for k, v in tokenizer(text).items() if k in ("input_ids", "attention_mask")}
                        for text in ["superb splendid superb", "dreadful rotten dreadful"] * 8], pad)
    losses = {}
    for weight in (0.0, 1.0):
        model = copy.deepcopy(result.model)
        model.eval()
        source = source_features(model, result.data.train[:32], "classification", pad, torch.device("cpu"))
        phase = AddaPhase(model, "classification", model.config.hidden_size, 32, learning_rate=1e-2, seed=0,
                          source_weight=weight)
        for _ in range(8):
            phase.discriminator_step(source, phase.target_features(target))
            phase.generator_step(target, source_rows)
        with torch.no_grad():
            losses[weight] = model(**source_rows).loss.item()
    assert losses[1.0] < losses[0.0]
