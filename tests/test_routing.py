"""Routing: signatures written at training, a router over the registry's signed adapters, `auto` in the runtime,
the CLI and the server."""

from __future__ import annotations

import json
import random
import shutil

import httpx
import pytest
import torch
from conftest import causal_recipe, classification_recipe, write_jsonl

from peft_adapt import AdapterRuntime, Registry, UserInputError, parse_recipe, train_domain
from peft_adapt.cli.main import main
from peft_adapt.formats import read_manifest
from peft_adapt.routing.router import SIGNATURE, mix_name, read_signature

DOMAINS = {
    "fruit": "apple banana cherry grape lemon mango melon peach pear plum".split(),
    "tools": "hammer wrench drill saw chisel pliers level clamp file vise".split(),
}
FAR = "ZQXJ 0987654321 ¤¤¤ ßßß ÆØÅ ### |||| ~~~~ %%%% @@@@ ^^^^ ```` }}}} {{{{ 9191919191"


def _texts(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(DOMAINS[domain]) for _ in range(10)) for _ in range(n)]


def _train(tmp, model, task: str, registry: Registry) -> dict[str, str]:
    names = {}
    for domain in DOMAINS:
        rows = [{"text": t, "label": i % 2} if task == "classification" else {"text": t}
                for i, t in enumerate(_texts(domain, 48, seed=1))]
        data = write_jsonl(tmp / f"{task}-{domain}.jsonl", rows)
        make = classification_recipe if task == "classification" else causal_recipe
        recipe = make(model, data, max_steps=3)
        recipe["name"], recipe["domains"] = task, {domain: {"train": str(data)}}
        result = train_domain(parse_recipe(recipe), domain, tmp / "out")
        names[domain] = registry.add(result.out_dir).name
    return names


@pytest.fixture(scope="module")
def routed(tmp_path_factory, tiny_llama, tiny_bert):
    tmp = tmp_path_factory.mktemp("routing")
    registry = Registry(tmp / "reg")
    causal = _train(tmp, tiny_llama, "causal_lm", registry)
    classifiers = _train(tmp, tiny_bert, "classification", registry)
    return registry, causal, classifiers


def _held_out() -> tuple[list[str], list[str]]:
    texts, truth = [], []
    for domain in DOMAINS:
        texts += _texts(domain, 10, seed=99)
        truth += [domain] * 10
    return texts, truth


def test_training_signs_the_adapter_and_its_checksum_covers_the_signature(routed):
    registry, causal, _ = routed
    entry = registry.get(causal["fruit"])
    signature = read_signature(entry.path)
    assert signature is not None and signature.features.shape[0] >= 8 and signature.layer == 0
    assert SIGNATURE in read_manifest(entry.path).files


def test_held_out_rows_of_each_domain_are_routed_to_its_adapter(routed, tiny_llama, tiny_bert):
    registry, causal, classifiers = routed
    texts, truth = _held_out()
    for base, task, names in ((tiny_llama, "causal_lm", causal), (tiny_bert, "classification", classifiers)):
        runtime = AdapterRuntime(str(base), task=task, quantization="none", registry=registry)
        routes = runtime.route(texts)
        assert [r.adapter for r in routes] == [names[d] for d in truth]
        assert min(r.confidence for r in routes) > 0.9 and not any(r.far for r in routes)


def test_a_routed_row_equals_the_row_served_with_its_adapter(routed, tiny_llama, tiny_bert):
    registry, causal, classifiers = routed
    texts, truth = _held_out()
    runtime = AdapterRuntime(str(tiny_llama), task="causal_lm", quantization="none", registry=registry)
    rows = texts[:2] + texts[-2:] + [FAR]  # a mixed batch: both domains and a row that goes to the base
    auto = runtime.logits(rows, adapters="auto")
    named = [causal[truth[0]]] * 2 + [causal[truth[-1]]] * 2 + [None]
    for i, name in enumerate(named):
        alone = runtime.logits([rows[i]], adapters=name)[0]
        real = alone.shape[0]
        assert (auto[i, :real] - alone).abs().max() < 1e-5
    assert runtime.generate(rows, "auto", max_new_tokens=4) == [
        runtime.generate([row], name, max_new_tokens=4)[0] for row, name in zip(rows, named)]
    classifier = AdapterRuntime(str(tiny_bert), task="classification", quantization="none", registry=registry)
    results = classifier.classify(texts, "auto")
    for text, domain, result in zip(texts, truth, results):
        assert result["adapter"] == classifiers[domain] and result["route"]["adapter"] == classifiers[domain]
        alone = classifier.classify([text], classifiers[domain])[0]
        assert max(abs(result["probs"][k] - alone["probs"][k]) for k in alone["probs"]) < 1e-5


def test_the_mix_with_weights_one_and_zero_is_the_first_adapter(routed, tiny_llama):
    registry, causal, _ = routed
    runtime = AdapterRuntime(str(tiny_llama), task="causal_lm", quantization="none", registry=registry)
    texts, _ = _held_out()
    first, second = causal["fruit"], causal["tools"]
    for weights, same_as in (({first: 1.0, second: 0.0}, first), ({first: 0.0, second: 1.0}, second)):
        mixed = runtime.logits(texts[:3], adapters=mix_name(weights))
        assert (mixed - runtime.logits(texts[:3], adapters=same_as)).abs().max() < 1e-5
    # a mix's name says its parts: served as the linear mix of those weights, loaded again from its name
    weights = {first: 0.3, second: 0.7}
    runtime.load("explicit", weights=weights)
    assert (runtime.logits(texts[:3], adapters=mix_name(weights))
            - runtime.logits(texts[:3], adapters="explicit")).abs().max() < 1e-5


def test_an_input_far_from_every_domain_goes_to_the_base(routed, tiny_llama, tiny_bert):
    registry, _, classifiers = routed
    runtime = AdapterRuntime(str(tiny_llama), task="causal_lm", quantization="none", registry=registry)
    route = runtime.route([FAR])[0]
    assert route.far and route.adapter is None and route.serve_as is None
    assert (runtime.logits([FAR], adapters="auto") - runtime.logits([FAR], adapters=None)).abs().max() == 0
    # a classifier has no base head: the far row takes the nearest domain's adapter, and says it is far
    classifier = AdapterRuntime(str(tiny_bert), task="classification", quantization="none", registry=registry)
    far = classifier.classify([FAR], "auto")[0]
    assert far["route"]["far"] and far["adapter"] in classifiers.values()


def test_a_router_never_mixes_bases_or_tasks(routed, tiny_llama):
    registry, causal, classifiers = routed
    runtime = AdapterRuntime(str(tiny_llama), task="causal_lm", quantization="none", registry=registry)
    assert set(runtime.router("auto").names) == set(causal.values())  # the classifiers are not among them
    with pytest.raises(UserInputError, match="a router serves one base and task"):
        runtime.router(f"auto:{causal['fruit']},{classifiers['tools']}")
    with pytest.raises(UserInputError, match="no signed causal_lm adapter"):
        runtime.router("auto:no-such-tag")


def test_a_changed_signature_is_refused_and_an_unsigned_adapter_is_signed_from_a_file(tmp_path, routed, tiny_llama,
                                                                                      capsys):
    source, causal, _ = routed
    registry = Registry(tmp_path / "reg")
    for name in causal.values():
        registry.add(source.get(name).path)
    runtime = AdapterRuntime(str(tiny_llama), task="causal_lm", quantization="none", registry=registry)
    signature = registry.get(causal["fruit"]).path / SIGNATURE
    signature.chmod(0o644)
    signature.write_bytes(signature.read_bytes()[:-2] + b"\x00\x01")
    with pytest.raises(UserInputError, match="signature does not match"):  # named outright: refused
        runtime.route(["apple pear"], ",".join(["auto:" + causal["fruit"], causal["tools"]]))
    assert runtime.router("auto").names == [causal["tools"]]  # `auto` leaves it out; the others still route
    # an adapter with no signature (a plain peft folder from elsewhere) is left out of `auto` until it is signed
    shutil.copytree(source.get(causal["fruit"]).path, tmp_path / "plain")
    for extra in ("manifest.json", SIGNATURE):
        (tmp_path / "plain" / extra).unlink()
    registry.import_peft(tmp_path / "plain", base=str(tiny_llama), name="fruit-imported")
    registry.remove(causal["fruit"])
    assert runtime.router("auto").names == [causal["tools"]]
    fruit_file = write_jsonl(tmp_path / "fruit.jsonl", [{"text": t} for t in _texts("fruit", 40, seed=5)])
    assert main(["registry", "sign", "fruit-imported", str(fruit_file), "--registry", str(registry.root),
                 "--quantization", "none"]) == 0
    assert "signed fruit-imported@2" in capsys.readouterr().out
    texts, truth = _held_out()
    assert [r.adapter for r in runtime.route(texts)] == [
        "fruit-imported" if d == "fruit" else causal["tools"] for d in truth]
    # the CLI prints each text's choice
    assert main(["route", *texts[:1], FAR, "--registry", str(registry.root), "--base", str(tiny_llama),
                 "--quantization", "none", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["serve_as"] == "fruit-imported" and lines[1]["far"] and lines[1]["serve_as"] is None


def test_the_server_routes_model_auto(routed, tiny_llama, tiny_bert):
    from test_server import _auth, _start

    registry, causal, classifiers = routed
    texts, truth = _held_out()
    runtime = AdapterRuntime(str(tiny_llama), task="causal_lm", quantization="none", registry=registry)
    proc, url = _start(tiny_llama, registry.root)
    try:
        response = httpx.post(f"{url}/v1/completions", headers=_auth(), timeout=60,
                              json={"model": "auto", "prompt": texts[-1], "max_tokens": 4, "temperature": 0})
        body = response.json()
        assert body["model"] == causal["tools"] == response.headers["x-peft-adapt-adapter"], body
        assert float(response.headers["x-peft-adapt-route-confidence"]) > 0.9
        assert body["choices"][0]["text"] == runtime.generate([texts[-1]], causal["tools"], max_new_tokens=4)[0]
        both = httpx.post(f"{url}/v1/completions", headers=_auth(), timeout=60,
                          json={"model": "auto", "prompt": [texts[0], FAR], "max_tokens": 4, "temperature": 0})
        assert both.headers["x-peft-adapt-adapter"] == f"{causal['fruit']},base" and both.json()["model"] == "auto"
        refused = httpx.post(f"{url}/v1/completions", headers=_auth(), timeout=60,
                             json={"model": f"auto:{causal['fruit']},{classifiers['fruit']}", "prompt": "x",
                                   "max_tokens": 2})
        assert refused.status_code == 400 and "one base and task" in refused.text
        metrics = httpx.get(f"{url}/metrics", headers=_auth()).text
        assert f'peft_adapt_routes_total{{adapter="{causal["tools"]}"}} 1.0' in metrics
        assert f'peft_adapt_routes_total{{adapter="{causal["fruit"]}"}} 1.0' in metrics
        assert 'peft_adapt_routes_total{adapter="base"} 1.0' in metrics
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    proc, url = _start(tiny_bert, registry.root)
    try:
        body = httpx.post(f"{url}/v1/classify", headers=_auth(), timeout=60,
                          json={"model": "auto", "input": [texts[0], texts[-1]]}).json()
        assert [d["model"] for d in body["data"]] == [classifiers["fruit"], classifiers["tools"]], body
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_ambiguous_input_gets_a_calibrated_top_k_mix():
    from peft_adapt.routing.router import Router, Signature

    generator = torch.Generator().manual_seed(0)
    shift = torch.zeros(16)
    shift[0] = 2.0
    samples = [torch.randn(400, 16, generator=generator), torch.randn(400, 16, generator=generator) + shift]
    router = Router(["a", "b"], [Signature(s, 0, 100.0) for s in samples])
    middle, inside_a, far = shift / 2, -shift, torch.zeros(16)
    far[3] = 60.0
    mixed, sure, away = router.route(torch.stack([middle, inside_a, far]), threshold=0.9)
    assert mixed.adapter is None and set(mixed.weights) == {"a", "b"} and abs(sum(mixed.weights.values()) - 1) < 0.011
    assert 0.4 < mixed.confidence < 0.6 and mixed.serve_as == mix_name(mixed.weights)
    assert sure.adapter == "a" and sure.confidence > 0.9
    assert away.far and away.adapter is None
    # calibrated: on fresh rows, the mean confidence is close to the accuracy
    fresh = [torch.randn(500, 16, generator=generator), torch.randn(500, 16, generator=generator) + shift]
    routes = router.route(torch.cat(fresh), fallback="nearest")
    accuracy = sum(r.nearest == d for r, d in zip(routes, ["a"] * 500 + ["b"] * 500)) / 1000
    assert abs(sum(r.confidence for r in routes) / 1000 - accuracy) < 0.03


def test_one_router_per_set_of_adapters_however_a_request_spells_it(routed, tiny_llama):
    registry, causal, _ = routed
    runtime = AdapterRuntime(str(tiny_llama), task="causal_lm", quantization="none", registry=registry)
    a, b = causal["fruit"], causal["tools"]
    assert runtime.router(f"auto:{a},{b}") is runtime.router(f"auto:{b}, {a},{b}")
    with pytest.raises(UserInputError, match="at most 64 adapters"):
        runtime.router("auto:" + ",".join(f"x{i}" for i in range(65)))


def test_route_names_the_task_to_use_and_the_adapters_it_routes_among(tmp_path, routed, tiny_bert, capsys):
    """A new user's path (issue 31): classifiers only, `route` without --task, then with it."""
    source, _, classifiers = routed
    registry = Registry(tmp_path / "reg")
    for name in classifiers.values():
        registry.add(source.get(name).path)
    flags = ["--registry", str(registry.root), "--quantization", "none"]
    assert main(["route", "apple pear", *flags]) == 2
    assert "add --task classification" in capsys.readouterr().err
    assert main(["route", "apple pear", *flags, "--base", str(tiny_bert)]) == 2
    assert "--task classification" in capsys.readouterr().err
    assert main(["route", "apple pear", *flags, "--task", "classification"]) == 0
    err = capsys.readouterr().err
    assert f"routing among 2 adapters (auto): {', '.join(sorted(classifiers.values()))}" in err
