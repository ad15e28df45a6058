"""Generative adaptation: a causal-LM generator trained on the target's text makes target-like samples, the source
classifier labels them, and the confident ones train the target adapter."""

from __future__ import annotations

import math

import torch
from conftest import classification_recipe, write_jsonl

from peft_adapt import AdapterRuntime, Registry, parse_recipe, train_recipe
from peft_adapt.data import IGNORE_INDEX
from peft_adapt.training.evaluation import nll_per_row


def test_generate_trains_the_target_adapter_on_samples_from_the_target_generator(tmp_path, tiny_bert, tiny_llama,
                                                                                 sentiment_file):
    rows = [{"text": " ".join(["superb splendid", "dreadful rotten"][i % 2] for _ in range(6)),
             "label": {"never": "read"}} for i in range(40)]  # a label no reader could take: it is never read
    target = write_jsonl(tmp_path / "target.jsonl", rows)
    data = classification_recipe(tiny_bert, sentiment_file, max_steps=6)
    data["domain_adaptation"] = {"method": "generate", "target": str(target), "generator": {
        "model": str(tiny_llama), "quantization": "none", "steps": 30, "learning_rate": 1e-2, "samples": 24,
        "prompt_words": 2, "max_new_tokens": 12, "threshold": 0.5, "balance": False},
        "safeguard": False}  # the generation is under test here (the safeguard's tests: test_safeguard.py): unguarded,
    # the target adapter is registered whatever label-free criteria would say of a 6-step tiny classifier
    registry = Registry(tmp_path / "reg")
    source = train_recipe(parse_recipe(data), tmp_path / "out", registry=registry)[0]
    adapted = source.adapted
    report = adapted.metrics["generated_samples"]
    assert report["generated"] == 24 and report["kept"] == len(adapted.generated) > 0
    assert all(s.confidence >= 0.5 and s.text.split()[0] in ("superb", "dreadful") for s in adapted.generated)
    assert {e.name for e in registry.list()} == {"t-sentiment", "t-sentiment-generate"}

    # the samples come from the generator: lower perplexity under its adapter than under the base alone
    runtime = AdapterRuntime(str(tiny_llama), quantization="none")
    texts = [s.text for s in adapted.generated]
    ids = [runtime.tokenizer(t)["input_ids"] for t in texts]

    def perplexity(adapter):
        logits = runtime.logits(ids, adapters=adapter)
        width = logits.shape[1]
        labels = torch.tensor([row + [IGNORE_INDEX] * (width - len(row)) for row in ids])
        sums = nll_per_row(logits, labels).sum(0)
        return math.exp(sums[0] / sums[1])

    assert perplexity(report["generator"]) < 0.8 * perplexity(None)
