"""Domain adapters (task masked_lm) under task adapters (`stack_on`): trained, registered, evaluated and served as
stacks `domain+task`, whose delta is the sum of their parts' deltas."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from conftest import classification_recipe, write_jsonl

from peft_adapt import AdapterRuntime, Registry, UserInputError, parse_recipe, train_domain
from peft_adapt.data import TaskSpec, read_eval_file, tokenize
from peft_adapt.formats import read_manifest, write_manifest
from peft_adapt.methods import method_of_folder
from peft_adapt.methods.lora import LORA
from peft_adapt.runtime.loading import load_registered
from peft_adapt.training.evaluation import predict_probabilities

TEXTS = ["good great fine nice", "awful broken sad poor", "lovely good", "bad bad awful"]


def _domain_recipe(model, train, quantization="none", steps=12):
    data = classification_recipe(model, train, quantization, max_steps=steps, logging_steps=1)
    data["task"] = {"type": "masked_lm", "max_length": 32}
    data["name"] = "dom"
    return data


@pytest.fixture(scope="module")
def stacks(tmp_path_factory, tiny_bert, sentiment_file, docs_file):
    """Two domain adapters (sentiment text, Python docs text), a classifier trained on the first, a plain one."""
    root = tmp_path_factory.mktemp("stacks")
    registry = Registry(root / "reg")
    domains = {}
    for name, text in (("dom-a", sentiment_file), ("dom-b", docs_file)):
        result = train_domain(parse_recipe(_domain_recipe(tiny_bert, text)), "sentiment", root / name, registry=registry)
        domains[name] = registry.add(result.out_dir, name=name)
    task = classification_recipe(tiny_bert, sentiment_file, max_steps=10)
    task["stack_on"] = "dom-a"
    stacked = train_domain(parse_recipe(task), "sentiment", root / "task", registry=registry)
    registry.add(stacked.out_dir, name="task")
    plain = train_domain(parse_recipe(classification_recipe(tiny_bert, sentiment_file, max_steps=6)), "sentiment",
                         root / "plain")
    registry.add(plain.out_dir, name="plain")
    return registry, stacked, domains


def _features(tokenizer, texts, max_length=32):
    return [{k: v for k, v in tokenizer(t, truncation=True, max_length=max_length).items()
             if k in ("input_ids", "attention_mask")} for t in texts]


def _probs(results) -> torch.Tensor:
    return torch.tensor([list(r["probs"].values()) for r in results])


def test_masked_lm_trains_a_domain_adapter_on_a_quantized_encoder(tmp_path, tiny_bert, sentiment_file):
    rows = [json.loads(line) | {"label": {"never": "read"}} for line in sentiment_file.read_text().splitlines()]
    train = write_jsonl(tmp_path / "unlabeled.jsonl", rows)  # labels that could not be read as labels
    result = train_domain(parse_recipe(_domain_recipe(tiny_bert, train, "nf4", steps=30)), "sentiment", tmp_path)
    history = json.loads((result.out_dir / "log_history.json").read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert result.manifest.task == "masked_lm" and result.manifest.method == "lora"
    assert 1 < result.metrics["eval"]["perplexity"] < 400 and result.metrics["eval"]["tokens"] > 0
    # the served weights leave the masked-LM head out: it trained the adapter, nothing served reads it
    weights = method_of_folder(result.out_dir).read(result.out_dir, strip_prefix="encoder.")
    assert weights.head == {} and all(path.startswith("encoder.layer.") for path in weights.sites)


def test_eval_rows_are_masked_the_same_way_every_time(tiny_bert, sentiment_file):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    task = TaskSpec(type="masked_lm", max_length=32)
    examples = read_eval_file(task, sentiment_file, None, max_rows=20)
    first, second = tokenize(examples, tokenizer, task), tokenize(examples, tokenizer, task)
    assert first == second
    for feature in first:
        chosen = [i for i, label in enumerate(feature["labels"]) if label != -100]
        assert chosen and feature["input_ids"][0] == tokenizer.cls_token_id and 0 not in chosen  # never a special token


def test_a_stack_serves_what_training_saw_and_eval_loads_it(stacks, tiny_bert):
    registry, stacked, _ = stacks
    tokenizer = stacked.backbone.tokenizer
    trained = predict_probabilities(stacked.model, _features(tokenizer, TEXTS), tokenizer.pad_token_id)
    runtime = AdapterRuntime(str(tiny_bert), task="classification", quantization="none", registry=registry)
    served = _probs(runtime.classify(TEXTS, "dom-a+task"))
    assert (served - trained).abs().max() < 1e-5
    loaded = load_registered(registry, "task")  # eval's path: the recorded domain adapter under the task adapter
    evaluated = predict_probabilities(loaded.model, _features(tokenizer, TEXTS), tokenizer.pad_token_id)
    assert (evaluated - trained).abs().max() < 1e-5
    assert read_manifest(registry.get("task").path).stack_on["ref"] == "dom-a@1"
    with pytest.raises(UserInputError, match=r"serve it as a stack, dom-a\+task"):
        runtime.classify(TEXTS, "task")


def test_a_stack_is_the_sum_of_its_parts_and_swapping_the_domain_changes_only_that_part(stacks, tiny_bert):
    registry, _, _ = stacks
    runtime = AdapterRuntime(str(tiny_bert), task="classification", quantization="none", registry=registry)
    parts = {ref: runtime.adapters.read(ref, False, role)[0] for ref, role in
             (("dom-a", "under"), ("dom-b", "under"), ("task", "top"))}
    for domain in ("dom-a", "dom-b"):
        stack = runtime.adapters.stack(f"{domain}+task", False)[0]
        for path, site in stack.sites.items():
            expected = sum(LORA.site_delta(parts[p].sites[path]) for p in (domain, "task") if path in parts[p].sites)
            assert (LORA.site_delta(site) - expected).abs().max() < 1e-6
        assert stack.head.keys() == parts["task"].head.keys()
        assert all(torch.equal(stack.head[k], parts["task"].head[k]) for k in stack.head)
    # served: the swap moves the output, and a mixed batch of stacks and a single adapter equals each row alone
    rows = ["dom-a+task", "dom-b+task", "plain", "dom-a+task"]
    mixed = _probs(runtime.classify(TEXTS, rows))
    alone = torch.cat([_probs(runtime.classify([text], name)) for text, name in zip(TEXTS, rows)])
    assert (mixed - alone).abs().max() < 1e-5
    a, b = _probs(runtime.classify(TEXTS, "dom-a+task")), _probs(runtime.classify(TEXTS, "dom-b+task"))
    assert (a - b).abs().max() > 1e-4


def test_stacks_across_bases_or_methods_are_refused(tmp_path, stacks, tiny_bert, sentiment_file):
    from peft_adapt.testing.tiny_models import build_tiny_model

    registry, stacked, _ = stacks
    other = build_tiny_model(tmp_path / "other-bert", "bert", seed=1)
    foreign = train_domain(parse_recipe(_domain_recipe(other, sentiment_file, steps=2)), "sentiment", tmp_path / "f")
    registry.add(foreign.out_dir, name="dom-other")
    runtime = AdapterRuntime(str(tiny_bert), task="classification", quantization="none", registry=registry)
    with pytest.raises(UserInputError, match="was trained on base"):
        runtime.classify(TEXTS, "dom-other+task")
    task = classification_recipe(tiny_bert, sentiment_file, max_steps=2) | {"stack_on": "dom-other"}
    with pytest.raises(UserInputError, match="share one base"):
        train_domain(parse_recipe(task), "sentiment", tmp_path / "t", registry=registry)
    # a manifest that claims another base's domain adapter is refused by the registry
    copy = tmp_path / "claim"
    import shutil

    shutil.copytree(stacked.out_dir, copy)
    manifest = read_manifest(copy)
    manifest.stack_on = manifest.stack_on | {"ref": "dom-other@1", "name": "dom-other", "version": 1,
                                             "weights_sha256": read_manifest(foreign.out_dir).files["adapter_model.safetensors"]}
    write_manifest(copy, manifest)
    with pytest.raises(UserInputError, match="must share one base"):
        registry.add(copy, name="claim")
    with pytest.raises(UserInputError, match="stack_on stacks LoRA adapters"):
        parse_recipe(task | {"stack_on": "dom-a", "adapter": {"method": "bottleneck"}})
    with pytest.raises(UserInputError, match="masked_lm"):
        runtime.classify(TEXTS, "dom-a")  # a domain adapter alone has no head to serve


def test_the_server_serves_a_stack(stacks, tiny_bert):
    from test_server import _auth, _start

    registry, _, _ = stacks
    proc, url = _start(tiny_bert, registry.root)
    try:
        runtime = AdapterRuntime(str(tiny_bert), task="classification", quantization="none", registry=registry)
        for model in ("dom-a+task", "dom-b+task"):
            body = httpx.post(f"{url}/v1/classify", headers=_auth(), json={"model": model, "input": TEXTS}).json()
            expected = runtime.classify(TEXTS, model)
            got = torch.tensor([list(d["probs"].values()) for d in body["data"]])
            assert (got - _probs(expected)).abs().max() < 1e-5, body
        refused = httpx.post(f"{url}/v1/classify", headers=_auth(), json={"model": "task+dom-a", "input": TEXTS})
        assert refused.status_code == 400 and "masked_lm" in refused.text
        flood = httpx.post(f"{url}/v1/classify", headers=_auth(), json={"model": "+".join(["dom-a"] * 40) + "+task",
                                                                         "input": TEXTS})
        assert flood.status_code == 400 and "at most 4 different adapters" in flood.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_causal_lm_stack_equals_its_training_model(tmp_path, tiny_llama, docs_file):
    from conftest import causal_recipe

    registry = Registry(tmp_path / "reg")
    domain = train_domain(parse_recipe(causal_recipe(tiny_llama, docs_file, max_steps=4)), "docs", tmp_path / "d")
    registry.add(domain.out_dir, name="docs-domain")
    task = causal_recipe(tiny_llama, docs_file, max_steps=4) | {"stack_on": "docs-domain"}
    stacked = train_domain(parse_recipe(task), "docs", tmp_path / "t", registry=registry)
    registry.add(stacked.out_dir, name="docs-task")
    ids = stacked.backbone.tokenizer(["def add(a, b):", "The function returns"], padding=True, return_tensors="pt")
    with torch.no_grad():
        trained = stacked.model.eval()(**ids).logits
    runtime = AdapterRuntime(str(tiny_llama), quantization="none", registry=registry)
    served = runtime.logits(ids["input_ids"], adapters="docs-domain+docs-task", attention_mask=ids["attention_mask"])
    real = ids["attention_mask"].bool()
    assert (served[real] - trained[real]).abs().max() < 1e-4


def test_a_stack_survives_export_and_import_into_another_registry(tmp_path, stacks, tiny_bert):
    registry, _, _ = stacks
    for ref in ("dom-a", "dom-b", "task"):
        registry.export(ref, tmp_path / ref)
    other = Registry(tmp_path / "other")
    with pytest.raises(UserInputError, match="register that domain adapter first"):
        other.import_peft(tmp_path / "task")  # refused whole: nothing is registered
    assert other.list() == []
    other.import_peft(tmp_path / "dom-b", name="dom-a")  # dom-a@1 here holds other weights
    other.import_peft(tmp_path / "dom-a")  # dom-a@2: the one the task adapter was trained on
    other.import_peft(tmp_path / "task")
    here = AdapterRuntime(str(tiny_bert), task="classification", quantization="none", registry=registry)
    there = AdapterRuntime(str(tiny_bert), task="classification", quantization="none", registry=other)
    assert (_probs(here.classify(TEXTS, "dom-a+task")) - _probs(there.classify(TEXTS, "dom-a@2+task"))).abs().max() < 1e-6
    evaluated = load_registered(other, "task")  # eval finds dom-a@2 by its weights, not by the version number
    tokenizer = evaluated.backbone.tokenizer
    probs = predict_probabilities(evaluated.model, _features(tokenizer, TEXTS), tokenizer.pad_token_id)
    assert (probs - _probs(here.classify(TEXTS, "dom-a+task"))).abs().max() < 1e-5


def test_a_domain_adapter_under_a_registered_task_adapter_is_not_removed(tmp_path, stacks):
    registry, _, _ = stacks
    with pytest.raises(UserInputError, match="remove task@1 first"):
        registry.remove("dom-a@1")
    assert registry.get("dom-a@1").path.is_dir()  # nothing was removed
    registry.remove("dom-b@1")  # no adapter stands on this one
