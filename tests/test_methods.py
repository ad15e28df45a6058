"""Bottleneck adapters, prefix tuning and (IA)3 through the whole path: recipe, training, registry, runtime, merge
(LoRA has its own files: test_train, test_runtime, test_merge)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import causal_recipe, classification_recipe

from peft_adapt import (
    AdapterRuntime,
    Registry,
    UserInputError,
    combine_adapters,
    export_model,
    parse_recipe,
    train_domain,
)
from peft_adapt.methods.bottleneck import BottleneckSpec, find_sites, inject_bottleneck
from peft_adapt.models.backbone import BaseSpec, load_backbone
from peft_adapt.runtime.loading import load_registered
from peft_adapt.testing.tiny_models import build_tiny_model

TEXTS = ["def add(a, b): return a + b", "The function returns", "class", "import os\nimport sys"]
METHOD_SPECS = {
    "bottleneck": {"method": "bottleneck", "variant": "houlsby", "bottleneck_size": 16},
    "prefix": {"method": "prefix", "num_virtual_tokens": 8, "projection": True, "projection_hidden_size": 32},
    "ia3": {"method": "ia3"},
}


@pytest.mark.parametrize("family, variant, sites_per_layer", [
    ("llama", "houlsby", 2), ("llama", "pfeiffer", 1), ("bert", "houlsby", 2), ("gpt2", "houlsby", 2),
])
def test_a_new_bottleneck_adapter_is_the_identity(tmp_path, family, variant, sites_per_layer):
    path = build_tiny_model(tmp_path / family, family)
    task = "encoder" if family == "bert" else "causal_lm"
    model = load_backbone(BaseSpec(model=str(path), quantization="none"), task).model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        before = model(input_ids=ids)[0]
    spec = BottleneckSpec(method="bottleneck", variant=variant, reduction_factor=4)
    assert len(find_sites(model, spec, model.config.model_type)) == 2 * sites_per_layer
    inject_bottleneck(model, spec, model.config.model_type)
    n_adapters = sum(1 for n, _ in model.named_modules() if n.endswith(".adapter"))
    assert n_adapters == 2 * sites_per_layer  # two layers in the tiny models
    with torch.no_grad():
        after = model(input_ids=ids)[0]
    assert torch.equal(before, after)


def test_bottleneck_sites_can_be_named_for_other_families(tiny_llama):
    model = load_backbone(BaseSpec(model=str(tiny_llama), quantization="none")).model
    spec = BottleneckSpec(method="bottleneck", modules=["up_proj"])
    assert find_sites(model, spec, "some-new-family") == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert find_sites(model, BottleneckSpec(method="bottleneck", variant="houlsby"), "some-new-family") == [
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    blockless = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    with pytest.raises(UserInputError, match="cannot tell the attention and feed-forward .* name the sublayer"):
        find_sites(blockless, BottleneckSpec(method="bottleneck"), "some-new-family")


def _first_and_last_loss(result) -> tuple[float, float]:
    history = json.loads((result.out_dir / "log_history.json").read_text())
    losses = [e["loss"] for e in history if "loss" in e]
    return losses[0], sum(losses[-3:]) / len(losses[-3:])


@pytest.mark.parametrize("method", ["bottleneck", "prefix", "ia3"])
@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_training_lowers_the_loss(tmp_path, tiny_llama, docs_file, method, quantization):
    data = causal_recipe(tiny_llama, docs_file, quantization, max_steps=30, logging_steps=1)
    data["adapter"] = METHOD_SPECS[method]
    data["training"]["learning_rate"] = 0.2 if method == "ia3" else 1e-2  # a few vectors near 1: a larger step
    result = train_domain(parse_recipe(data), "docs", tmp_path)
    first, last = _first_and_last_loss(result)
    assert last < first - 0.1, (first, last)
    assert result.manifest.method == method


@pytest.mark.parametrize("method", ["bottleneck", "prefix", "ia3"])
def test_classifiers_train_with_every_method(tmp_path, tiny_bert, sentiment_file, method):
    data = classification_recipe(tiny_bert, sentiment_file, "nf4", max_steps=30, logging_steps=1)
    data["adapter"] = METHOD_SPECS[method]
    data["task"]["pooling"] = "mean"  # a random tiny BERT's CLS token carries too little to learn from in 30 steps
    result = train_domain(parse_recipe(data), "sentiment", tmp_path)
    first, last = _first_and_last_loss(result)
    assert last < first - 0.1, (first, last)
    from peft_adapt.runtime.loading import load_trained

    loaded = load_trained(result.out_dir)  # a fresh load predicts what the trained model predicted
    enc = loaded.backbone.tokenizer(["good great", "awful poor"], return_tensors="pt", padding=True)
    with torch.no_grad():
        fresh = loaded.model(**enc).logits
        trained = result.model.eval()(**enc).logits
    # a fresh nf4 load runs the bf16 inference kernel (DESIGN.md): close, not bit-equal
    assert (fresh - trained).abs().max() < 2e-2 and torch.equal(fresh.argmax(-1), trained.argmax(-1))
    # the runtime serves it (a prefix classifier through its group model), rows of any length together
    runtime = AdapterRuntime(str(tiny_bert), task="classification", quantization="nf4")
    texts = ["good great", "awful poor and sad", "fine"]
    served = runtime.classify(texts, str(result.out_dir))
    enc = loaded.backbone.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = loaded.model(**enc).logits.softmax(-1)
    for row, probs in zip(served, expected):
        assert max(abs(a - b) for a, b in zip(row["probs"].values(), probs.tolist())) < 1e-4, (row, probs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, docs_file):
    """Two adapters of each method on the unquantized tiny Llama (different seeds), in one registry."""
    root = tmp_path_factory.mktemp("methods")
    registry = Registry(root / "reg")
    for method in METHOD_SPECS:
        for seed in (0, 1):
            data = causal_recipe(tiny_llama, docs_file, "none", max_steps=15, seed=seed)
            data["adapter"] = METHOD_SPECS[method]
            result = train_domain(parse_recipe(data), "docs", root / f"{method}{seed}")
            registry.add(result.out_dir, name=f"{method}{seed}")
    return registry


@pytest.mark.parametrize("method", ["bottleneck", "prefix", "ia3"])
def test_registry_round_trip_is_bit_identical(tmp_path, trained, method):
    entry = trained.get(f"{method}0")
    out = trained.export(entry.ref, tmp_path / "out")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    for f in entry.path.iterdir():
        assert digest(f) == digest(out / f.name), f.name
    assert trained.verify().ok


def _mixed_equals_alone(rt, names, atol=1e-5):
    mixed = rt.logits(TEXTS, adapters=names)
    ids = rt.tokenizer(TEXTS)["input_ids"]
    for i, (row, name) in enumerate(zip(ids, names)):
        alone = rt.logits([row], adapters=name)[0]
        assert (mixed[i, : len(row)] - alone).abs().max() < atol, (i, name)
    greedy = rt.generate(TEXTS, adapters=names, max_new_tokens=6, return_tokens=True)
    assert greedy == [rt.generate([t], adapters=n, max_new_tokens=6, return_tokens=True)[0] for t, n in zip(TEXTS, names)]


def test_mixed_batch_of_bottleneck_adapters_equals_each_row_alone(tiny_llama, trained):
    rt = AdapterRuntime(str(tiny_llama), quantization="none", registry=trained)
    _mixed_equals_alone(rt, ["bottleneck0", "bottleneck1", None, "bottleneck0"])


def test_mixed_batch_of_prefix_adapters_equals_each_row_alone(tiny_llama, trained):
    rt = AdapterRuntime(str(tiny_llama), quantization="none", registry=trained)
    _mixed_equals_alone(rt, ["prefix0", "prefix1", None, "prefix1"])


def test_mixed_batch_of_ia3_adapters_equals_each_row_alone(tiny_llama, trained):
    rt = AdapterRuntime(str(tiny_llama), quantization="none", registry=trained)
    _mixed_equals_alone(rt, ["ia30", "ia31", None, "ia30"])


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_one_batch_mixes_every_method(tiny_llama, trained, tmp_path, quantization):
    """Rows of all four methods and the base in one call: each equals the row alone (fp32 logits < 1e-5; on nf4,
    whose 4-bit kernels round by batch shape, the greedy tokens)."""
    from test_runtime import make_lora

    if "lora-mix" not in {e.name for e in trained.list()}:
        trained.import_peft(make_lora(tiny_llama, tmp_path / "lora", 4, ["q_proj", "v_proj"], seed=0),
                            base=str(tiny_llama), name="lora-mix")
    rt = AdapterRuntime(str(tiny_llama), quantization=quantization, registry=trained)
    names = ["bottleneck0", "prefix0", "lora-mix", None, "ia30", "ia31"]
    texts = TEXTS + TEXTS[:2]
    if quantization == "none":
        mixed = rt.logits(texts, adapters=names)
        for i, (row, name) in enumerate(zip(rt.tokenizer(texts)["input_ids"], names)):
            assert (mixed[i, : len(row)] - rt.logits([row], adapters=name)[0]).abs().max() < 1e-5, (i, name)
    greedy = rt.generate(texts, adapters=names, max_new_tokens=6, return_tokens=True)
    assert greedy == [rt.generate([t], adapters=n, max_new_tokens=6, return_tokens=True)[0] for t, n in zip(texts, names)]


def test_continuous_batching_serves_rows_of_every_method(tiny_llama, trained, tmp_path):
    """Bottleneck, IA3, LoRA and base rows share the running batch; a prefix-tuning row (a group method) is served
    whole between steps: every row gives what it gives alone."""
    from test_continuous import alone, served_together
    from test_runtime import make_lora

    from peft_adapt.runtime.batcher import DynamicBatcher
    from peft_adapt.runtime.decoding import Sampling

    if "lora-mix" not in {e.name for e in trained.list()}:
        trained.import_peft(make_lora(tiny_llama, tmp_path / "lora", 4, ["q_proj", "v_proj"], seed=0),
                            base=str(tiny_llama), name="lora-mix")
    rt = AdapterRuntime(str(tiny_llama), quantization="none", registry=trained)
    names = ["bottleneck0", "prefix0", "lora-mix", None, "ia30", "ia31"]
    prompts = [rt.tokenizer(t)["input_ids"] for t in TEXTS + TEXTS[:2]]
    samplings = [Sampling(6, do_sample=i % 2 == 0, seed=i) for i in range(len(names))]
    expected = [alone(rt, p, n, s) for p, n, s in zip(prompts, names, samplings)]
    assert served_together(DynamicBatcher(rt, prefill_chunk=4), list(zip(prompts, names, samplings))) == expected


@pytest.mark.parametrize("method", ["bottleneck", "prefix", "ia3"])
def test_runtime_computes_what_the_trained_model_computes(tiny_llama, trained, method):
    rt = AdapterRuntime(str(tiny_llama), quantization="none", registry=trained)
    loaded = load_registered(trained, f"{method}0")
    ids = torch.tensor([rt.tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        expected = loaded.model(input_ids=ids).logits
    assert (rt.logits(ids, adapters=f"{method}0") - expected).abs().max() < 1e-5
    base = rt.logits(ids, adapters=None)
    assert (expected - base).abs().max() > 1e-3  # the adapter does something


@pytest.mark.parametrize("method", ["bottleneck", "prefix", "ia3"])
def test_linear_averaging_of_one_method_and_what_export_says(tmp_path, tiny_llama, trained, method):
    entry = combine_adapters(trained, [f"{method}0", f"{method}1"], "linear", f"{method}-avg", weights=[1.0, 0.0])
    rt = AdapterRuntime(str(tiny_llama), quantization="none", registry=trained)
    assert (rt.logits(TEXTS, adapters=entry.ref) - rt.logits(TEXTS, adapters=f"{method}0")).abs().max() < 1e-5
    half = combine_adapters(trained, [f"{method}0", f"{method}1"], "linear", f"{method}-half")
    assert half.manifest.merge["weights"] == [0.5, 0.5]
    with pytest.raises(UserInputError, match="combine by linear averaging only"):
        combine_adapters(trained, [f"{method}0", f"{method}1"], "ties", "nope")
    if method == "ia3":  # rescaling rows or columns of a weight folds exactly
        report = export_model(trained, f"{method}0", tmp_path / "folded", dtype="fp32", probe=None, fidelity="logits")
        assert report["variants"]["export_fp32"]["max_abs_logit_diff"] < 1e-4
        return
    with pytest.raises(UserInputError, match="cannot be exported into base weights: (a bottleneck adapter adds new layers|prefix tuning adds learned key/value)"):
        export_model(trained, f"{method}0", tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_methods_do_not_mix_in_a_merge(trained):
    with pytest.raises(UserInputError, match="only adapters of one method can be merged"):
        combine_adapters(trained, ["bottleneck0", "prefix0"], "linear", "nope")


def test_the_wrong_base_guard_covers_every_method(tmp_path, trained):
    other = build_tiny_model(tmp_path / "other", "llama", seed=3)
    backbone = load_backbone(BaseSpec(model=str(other), quantization="none"))
    for ref in ("bottleneck0", "prefix0", "ia30"):
        with pytest.raises(UserInputError, match="weights: same shapes, different weight values"):
            load_registered(trained, ref, backbone=backbone)
        with pytest.raises(UserInputError, match="trained on base .* weights: same shapes, different weight values"):
            AdapterRuntime(str(other), quantization="none", registry=trained).load(ref)


def test_a_prefix_adapter_loaded_after_inference_on_nf4_equals_a_fresh_load(tiny_llama, trained):
    """peft's loader onto a model that has served (its 4-bit weights repacked on AVX512-BF16 CPUs) gives garbage;
    the runtime copies the prefix embedding itself."""
    served = AdapterRuntime(str(tiny_llama), quantization="nf4", registry=trained)
    served.logits(TEXTS, adapters=None)  # inference first
    served.load("prefix0")
    fresh = AdapterRuntime(str(tiny_llama), quantization="nf4", registry=trained)
    fresh.load("prefix0")
    after, before = served.logits(TEXTS[:1], adapters="prefix0"), fresh.logits(TEXTS[:1], adapters="prefix0")
    assert (after - before).abs().max() < 1e-4
    assert (after - served.logits(TEXTS[:1], adapters=None)).abs().max() > 1e-2  # and the prefix does something


# ---- (IA)3: what the other methods' tests do not cover


def test_a_new_ia3_adapter_is_the_identity(tiny_llama):
    from peft_adapt.methods import method

    model = load_backbone(BaseSpec(model=str(tiny_llama), quantization="none")).model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        wrapped = method("ia3").inject(model, method("ia3").spec(method="ia3"), "causal_lm", [], "llama")
        after = wrapped(input_ids=ids).logits
    assert torch.equal(before, after)
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == 2 * (32 + 32 + 128)  # k, v, down x2


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_vanilla_peft_reproduces_the_runtimes_ia3_logits(tiny_llama, trained, quantization):
    from peft import PeftModel

    rt = AdapterRuntime(str(tiny_llama), quantization=quantization, registry=trained)
    ids = torch.tensor([rt.tokenizer(TEXTS[0])["input_ids"]])
    plain = PeftModel.from_pretrained(load_backbone(BaseSpec(model=str(tiny_llama), quantization=quantization)).model,
                                      trained.get("ia30").path).eval()
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
    # nf4: a fresh model's first forward and the runtime's both run the bf16 inference kernel
    assert (rt.logits(ids, adapters="ia30") - expected).abs().max() < (1e-5 if quantization == "none" else 2e-2)


def test_ia3_trained_on_nf4_exports_as_faithfully_as_the_noise_floor(tmp_path, tiny_llama, docs_file):
    data = causal_recipe(tiny_llama, docs_file, "nf4", max_steps=20, learning_rate=5e-2)
    data["adapter"] = METHOD_SPECS["ia3"]
    result = train_domain(parse_recipe(data), "docs", tmp_path / "run")
    registry = Registry(tmp_path / "reg")
    registry.add(result.out_dir)
    report = export_model(registry, "t-docs", tmp_path / "exported", dtype="fp32", probe=docs_file,
                          fidelity="logits")
    floor = report["noise_floor"]["top1_agreement"]
    assert report["variants"]["export_fp32"]["top1_agreement"] >= floor - 0.005, report


def _tiny_from_config(family: str, **shape):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from peft_adapt.models.backbone import is_causal_decoder

    config = AutoConfig.for_model(family, vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=64, pad_token_id=0, **shape)
    torch.manual_seed(0)
    if is_causal_decoder(config):
        return AutoModelForCausalLM.from_config(config), "causal_lm"
    return AutoModel.from_config(config), "classification"


@pytest.mark.parametrize("family, shape, attention, ffn", [
    ("llama", {"intermediate_size": 64}, "self_attn.o_proj", "mlp.down_proj"),
    ("gpt2", {}, "attn.c_proj", "mlp.c_proj"),
    ("bert", {"intermediate_size": 64}, "attention.output.dense", "output.dense"),
    ("phi3", {"intermediate_size": 64}, "self_attn.o_proj", "mlp.down_proj"),
    ("distilbert", {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4}, "attention.out_lin", "ffn.lin2"),
    ("modernbert", {"intermediate_size": 64}, "attn.Wo", "mlp.Wo"),
    ("opt", {"ffn_dim": 64, "word_embed_proj_dim": 32}, "self_attn.out_proj", "fc2"),
])
def test_default_adapter_sites_come_from_the_blocks_structure(family, shape, attention, ffn):
    """Issue 32: bottleneck sites were known for six model types and (IA)3 had no defaults for Phi3, DistilBERT or
    ModernBERT; both now read each block's attention and feed-forward sublayers from the modules."""
    model, task = _tiny_from_config(family, **shape)
    sites = find_sites(model, BottleneckSpec(method="bottleneck", variant="houlsby"), family)
    assert len(sites) == 4 and sites[0].endswith("0." + attention) and sites[1].endswith("0." + ffn), sites
    assert find_sites(model, BottleneckSpec(method="bottleneck", variant="pfeiffer"), family) == [sites[1], sites[3]]
    from peft_adapt.methods import method

    adapted = method("ia3").inject(model, method("ia3").spec(method="ia3"), task, [], family)
    vectors = [n for n, _ in adapted.named_parameters() if "ia3_l" in n]
    assert vectors and any(ffn.split(".")[-1] in n for n in vectors)
