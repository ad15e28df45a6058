"""The model a user brings: tiny random models of each architecture transformers builds offline, through every stage
(train on nf4, registry, a mixed batch against each row alone and against plain peft, export against the unmerged
adapter, one server request): causal decoders, encoders (classifiers) and encoder-decoders (seq2seq)."""

from __future__ import annotations

import pytest
import torch
from conftest import causal_recipe, classification_recipe
from fastapi.testclient import TestClient

from peft_adapt import AdapterRuntime, Registry, UserInputError, export_model, parse_recipe, train_domain
from peft_adapt.models.backbone import BaseSpec, load_backbone
from peft_adapt.server.app import create_app
from peft_adapt.server.schemas import ServerSettings
from peft_adapt.testing.tiny_models import build_tiny_architecture

CAUSAL = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt", "falcon"]
ENCODERS = ["bert", "roberta", "deberta-v2", "modernbert", "distilbert"]
TEXTS = ["def add(a, b): return a + b", "The function", "import os\nimport sys"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    return lambda model_type: build_tiny_architecture(root / model_type, model_type)


def _train(recipe: dict, out, r: int, seed: int):
    recipe["adapter"] |= {"r": r, "alpha": 2 * r}
    recipe["training"] |= {"seed": seed}
    return train_domain(parse_recipe(recipe), next(iter(recipe["domains"])), out).out_dir


def _served(runtime, registry, path: str, body: dict) -> dict:
    """One request through the server's app (in process: the HTTP layer is the same for every architecture)."""
    app = create_app(runtime, registry, ServerSettings(base_name="base"))
    with TestClient(app) as client:
        response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


OTHER_QUANTIZATIONS = [(m, q) for m in ("llama", "gpt2", "opt") for q in ("int8", "none")]


@pytest.mark.parametrize("model_type, quantization", [(m, "nf4") for m in CAUSAL] + OTHER_QUANTIZATIONS)
def test_a_causal_architecture_through_every_stage(bases, tmp_path, docs_file, model_type, quantization):
    from peft import PeftModel

    base = bases(model_type)
    registry = Registry(tmp_path / "reg")
    for name, r, seed in (("a", 4, 0), ("b", 2, 1)):
        recipe = causal_recipe(base, docs_file, quantization, max_steps=3, learning_rate=5e-2)
        registry.add(_train(recipe, tmp_path / name, r, seed), name=name)
    runtime = AdapterRuntime(str(base), quantization=quantization, registry=registry)
    names = ["a", "b", None]
    mixed = runtime.logits(TEXTS, adapters=names)
    rows = runtime.tokenizer(TEXTS)["input_ids"]
    for i, (row, name) in enumerate(zip(rows, names)):
        alone = runtime.logits([row], adapters=name)[0]
        assert (mixed[i, : len(row)] - alone).abs().max() < 1e-4, (model_type, name)
    assert (mixed[0, : len(rows[0])] - runtime.logits([rows[0]], adapters=None)[0]).abs().max() > 1e-4  # it adapts
    plain = PeftModel.from_pretrained(load_backbone(BaseSpec(model=str(base), quantization=quantization)).model,
                                      registry.get("a").path).eval()
    with torch.no_grad():
        theirs = plain(input_ids=torch.tensor([rows[0]])).logits[0]
    assert (theirs - runtime.logits([rows[0]], adapters="a")[0]).abs().max() < 1e-3, model_type
    report = export_model(registry, "a", tmp_path / "out", dtype="fp32", probe=docs_file, probe_tokens=256,
                          fidelity="logits")
    agreement, floor = report["variants"]["export_fp32"]["top1_agreement"], report["noise_floor"]["top1_agreement"]
    if quantization == "int8" and agreement < floor:  # LLM.int8 rounds activations too: said, not hidden
        assert "int8" in report["warnings"][0], report
    else:
        assert agreement >= floor - 0.02, report
    body = _served(runtime, registry, "/v1/completions", {"model": "b", "prompt": TEXTS[1], "max_tokens": 4,
                                                          "temperature": 0})
    assert body["choices"][0]["text"] == runtime.generate([TEXTS[1]], adapters="b", max_new_tokens=4)[0]


@pytest.mark.parametrize("model_type, quantization", [(m, "nf4") for m in ENCODERS] + [("bert", "int8"), ("bert", "none")])
def test_an_encoder_architecture_through_every_stage(bases, tmp_path, sentiment_file, model_type, quantization):
    base = bases(model_type)
    registry = Registry(tmp_path / "reg")
    for name, r, seed in (("a", 4, 0), ("b", 2, 1)):
        recipe = classification_recipe(base, sentiment_file, quantization, max_steps=3)
        registry.add(_train(recipe, tmp_path / name, r, seed), name=name)
    runtime = AdapterRuntime(str(base), task="classification", quantization=quantization, registry=registry)
    texts = ["good great fine", "awful", "fine but slow and sad"]
    mixed = runtime.classify(texts, ["a", "b", "a"])
    for text, name, result in zip(texts, ["a", "b", "a"], mixed):
        alone = runtime.classify([text], name)[0]
        assert max(abs(x - y) for x, y in zip(result["probs"].values(), alone["probs"].values())) < 1e-5
    report = export_model(registry, "a", tmp_path / "out", dtype="fp32", probe=sentiment_file, fidelity="logits")
    assert report["label_agreement"] >= 0.95 and report["max_abs_prob_diff"] < 0.05, report  # nf4 served, fp32 saved
    body = _served(runtime, registry, "/v1/classify", {"model": "b", "input": texts})
    assert [d["label"] for d in body["data"]] == [r["label"] for r in runtime.classify(texts, "b")]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Input/target pairs: five words in, the first of them out."""
    import json
    import random

    rng = random.Random(0)
    words = "apple river stone cloud music paper garden window silver forest candle ocean".split()
    rows = [rng.sample(words, 5) for _ in range(96)]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": " ".join(w), "completion": w[0]}) + "\n" for w in rows))
    return path


def _seq2seq_recipe(base, pairs_file, quantization: str) -> dict:
    return {"base": {"model": str(base), "quantization": quantization}, "task": {"type": "seq2seq", "max_length": 32},
            "adapter": {"method": "lora", "r": 8, "alpha": 16}, "training": {"max_steps": 3, "batch_size": 16,
                                                                            "learning_rate": 1e-2},
            "domains": {"first": {"train": str(pairs_file)}}}


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_an_encoder_decoder_through_every_stage(bases, tmp_path, pairs_file, docs_file, model_type, capsys):
    from peft import PeftModel

    base = bases(model_type)
    registry = Registry(tmp_path / "reg")
    for name, r, seed in (("a", 4, 0), ("b", 2, 1)):
        registry.add(_train(_seq2seq_recipe(base, pairs_file, "nf4"), tmp_path / name, r, seed), name=name)
    runtime = AdapterRuntime(str(base), task="seq2seq", quantization="nf4", registry=registry)
    prompts = ["apple river stone cloud music", "paper garden", "window silver forest candle ocean apple"]
    names = ["a", "b", None]
    mixed = runtime.generate(prompts, names, max_new_tokens=5, return_tokens=True)
    assert mixed == [runtime.generate([p], [n], max_new_tokens=5, return_tokens=True)[0] for p, n in zip(prompts, names)]
    with pytest.raises(UserInputError, match="auto routes causal LM and classifier rows"):
        runtime.generate(prompts[:1], "auto", max_new_tokens=2)
    targets = ["apple", "paper garden", "window"]
    logits = runtime.target_logits(prompts, targets, names)
    alone = runtime.target_logits(prompts[:1], targets[:1], "a")[0]
    assert (logits[0, : alone.shape[0]] - alone).abs().max() < 1e-4
    assert (alone - runtime.target_logits(prompts[:1], targets[:1], None)[0]).abs().max() > 1e-4  # it adapts
    plain = PeftModel.from_pretrained(load_backbone(BaseSpec(model=str(base), quantization="nf4"), "seq2seq").model,
                                      registry.get("a").path).eval()
    ids = runtime.tokenizer(prompts[:1], return_tensors="pt")
    labels = runtime.tokenizer(targets[:1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs = plain(**ids, labels=labels).logits[0]
        written = plain.generate(**ids, max_new_tokens=5, do_sample=False)[0, 1:].tolist()
    assert (theirs - alone).abs().max() < 1e-3
    assert written[: len(mixed[0])] == mixed[0]
    report = export_model(registry, "a", tmp_path / "out", dtype="fp32", probe=pairs_file, probe_tokens=128,
                          fidelity="logits")
    assert report["variants"]["export_fp32"]["top1_agreement"] >= report["noise_floor"]["top1_agreement"] - 0.02, report
    body = _served(runtime, registry, "/v1/completions", {"model": "b", "prompt": prompts[1], "max_tokens": 4,
                                                          "temperature": 0})
    assert body["choices"][0]["text"] == runtime.generate([prompts[1]], adapters="b", max_new_tokens=4)[0]
    from peft_adapt.cli.main import main

    assert main(["generate", "--adapter", "b", "--registry", str(registry.root), "--max-new-tokens", "4",
                 prompts[1]]) == 0  # the command line picks the seq2seq runtime from the adapter
    assert f"[b] {prompts[1]} -> {body['choices'][0]['text']}" in capsys.readouterr().out
    with pytest.raises(UserInputError, match=f"is an encoder-decoder model \\({model_type}\\): train it with task seq2seq"):
        train_domain(parse_recipe(causal_recipe(base, docs_file, "nf4", max_steps=1)), "docs", tmp_path)


def test_seq2seq_on_a_decoder_is_refused_by_name(bases, tmp_path, pairs_file):
    with pytest.raises(UserInputError, match="task seq2seq takes an encoder-decoder model .* is not one"):
        train_domain(parse_recipe(_seq2seq_recipe(bases("llama"), pairs_file, "nf4")), "first", tmp_path)


@pytest.mark.parametrize("model_type", CAUSAL)
def test_a_decoder_classifier_reads_past_the_first_word_on_every_causal_architecture(bases, model_type):
    """Issue 32: on OPT, Falcon and Gemma3, `pooling: auto` read the first token of a causal decoder, so texts
    sharing their first word got one answer."""
    backbone = load_backbone(BaseSpec(model=str(bases(model_type)), quantization="none"), "classification", 2, "auto")
    assert backbone.model.pooling == "last"
    batch = backbone.tokenizer(["the cat sat", "the dog ran far"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = backbone.model.eval()(**batch).logits
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_a_seq2seq_lora_learns_what_the_base_cannot_and_says_so_in_its_metrics(bases, tmp_path, pairs_file):
    from peft_adapt.training.evaluation import evaluate_file, rouge_l

    assert rouge_l([1, 2, 3, 4], [1, 3, 4]) == pytest.approx(2 * 3 / 7) and rouge_l([1], [2]) == 0.0
    recipe = _seq2seq_recipe(bases("t5"), pairs_file, "nf4")
    recipe["training"] |= {"max_steps": 60}
    recipe["domains"]["first"]["test"] = str(pairs_file)
    result = train_domain(parse_recipe(recipe), "first", tmp_path)
    trained = result.metrics["test"]
    base = evaluate_file(result.out_dir, pairs_file, base_only=True)
    assert set(trained) >= {"loss", "perplexity", "exact_match", "rouge_l"}
    assert trained["loss"] < base["loss"] - 1 and trained["rouge_l"] > base["rouge_l"] + 0.05, (trained, base)
