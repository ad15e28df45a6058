"""Merging and export: methods match the papers, exports compute what the unmerged model computes."""

from __future__ import annotations

import json

import pytest
import torch
from test_runtime import TEXTS, make_lora

from peft_adapt import AdapterRuntime, Registry, UserInputError, combine_adapters, export_adapter_folder, export_model
from peft_adapt.cli.main import main
from peft_adapt.merge.methods import DELTA_METHODS
from peft_adapt.methods.lora import LORA, lora_delta

# ---- the methods against references written from the papers, entry by entry


def _reference(method: str, deltas: list[torch.Tensor], weights: list[float], density: float, seed: int) -> torch.Tensor:
    out_shape = deltas[0].shape
    flat = [d.reshape(-1).tolist() for d in deltas]
    n = len(flat[0])
    if method in ("dare_linear", "dare_ties"):
        # DARE (Yu et al. 2023): drop each entry with probability 1 - p, rescale the rest by 1 / p
        generator = torch.Generator().manual_seed(seed)
        kept = [(torch.rand(out_shape, generator=generator) < density).reshape(-1).tolist() for _ in deltas]
        flat = [[v / density if keep else 0.0 for v, keep in zip(f, k)] for f, k in zip(flat, kept)]
    if method in ("ties", "magnitude_prune"):
        # keep the top-k magnitudes of each task vector (TIES step 1, "trim")
        k = int(density * n)
        trimmed = []
        for f in flat:
            threshold_ids = set(sorted(range(n), key=lambda i: -abs(f[i]))[:k])
            trimmed.append([v if i in threshold_ids else 0.0 for i, v in enumerate(f)])
        flat = trimmed
    if method in ("linear", "magnitude_prune", "dare_linear"):
        merged = [sum(w * f[i] for f, w in zip(flat, weights)) for i in range(n)]
    else:
        # TIES steps 2-3: elect the sign of the summed trimmed values, average the weighted values that agree
        merged = []
        for i in range(n):
            elected = 1.0 if sum(f[i] for f in flat) >= 0 else -1.0
            agreeing = [w * f[i] for f, w in zip(flat, weights) if (f[i] > 0) - (f[i] < 0) == elected]
            merged.append(sum(agreeing) / max(1, len(agreeing)))
    return torch.tensor(merged, dtype=torch.float32).view(out_shape)


@pytest.mark.parametrize("method", sorted(DELTA_METHODS))
def test_delta_methods_match_the_papers_definitions(method):
    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(6, 5, generator=generator) for _ in range(3)]
    weights, density, seed = [0.5, 0.3, 0.2], 0.4, 11
    got = DELTA_METHODS[method](deltas, weights, density, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(got, _reference(method, deltas, weights, density, seed), atol=1e-6, rtol=1e-6)


# ---- combining registered adapters


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("merge")
    registry = Registry(root / "reg")
    make_lora(tiny_llama, root / "a", 4, ["q_proj", "v_proj"], seed=1)
    make_lora(tiny_llama, root / "b", 8, ["v_proj", "up_proj"], seed=2)  # another rank, partly other layers
    registry.import_peft(root / "a", base=str(tiny_llama), name="a")
    registry.import_peft(root / "b", base=str(tiny_llama), name="b")
    return registry


def _deltas(registry: Registry, ref: str) -> dict[str, torch.Tensor]:
    return {p: lora_delta(*m) for p, m in LORA.read(registry.get(ref).path).sites.items()}


def test_linear_with_weights_1_0_equals_the_first_adapter(tiny_llama, two_adapters):
    entry = combine_adapters(two_adapters, ["a", "b"], "linear", "lin10", weights=[1.0, 0.0])
    assert entry.manifest.merge["parents"] == ["a@1", "b@1"]
    rt = AdapterRuntime(str(tiny_llama), quantization="none", registry=two_adapters)
    assert (rt.logits(TEXTS, adapters="lin10") - rt.logits(TEXTS, adapters="a")).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_cat_and_linear_are_the_exact_weighted_sum(two_adapters, method):
    combine_adapters(two_adapters, ["a", "b"], method, f"sum-{method}", weights=[0.7, -0.3])
    a, b, merged = _deltas(two_adapters, "a"), _deltas(two_adapters, "b"), _deltas(two_adapters, f"sum-{method}")
    for path, delta in merged.items():
        expected = 0.7 * a.get(path, torch.zeros_like(delta)) - 0.3 * b.get(path, torch.zeros_like(delta))
        torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "magnitude_prune"])
def test_merged_adapters_carry_the_methods_delta_at_full_rank(two_adapters, method):
    entry = combine_adapters(two_adapters, ["a", "b"], method, f"full-{method}", weights=[0.6, 0.4], density=0.5,
                             seed=3, rank=64)  # rank >= min(out, in): the SVD loses nothing
    a, b, merged = _deltas(two_adapters, "a"), _deltas(two_adapters, "b"), _deltas(two_adapters, f"full-{method}")
    generator = torch.Generator().manual_seed(3)
    for path in sorted(set(a) | set(b)):
        zero = torch.zeros_like(merged[path])
        expected = DELTA_METHODS[method]([a.get(path, zero), b.get(path, zero)], [0.6, 0.4], 0.5, generator)
        torch.testing.assert_close(merged[path], expected, atol=1e-5, rtol=1e-4)
    assert entry.manifest.merge["relative_error_max"] < 1e-5


def test_svd_recompresses_to_the_largest_parent_rank_and_reports_the_loss(two_adapters):
    entry = combine_adapters(two_adapters, ["a", "b"], "svd", "svd8")
    assert LORA.read(entry.path).extent == 8
    assert 0 < entry.manifest.merge["relative_error_max"] < 1


def test_merge_refuses_adapters_of_different_bases(tmp_path, two_adapters, tiny_llama):
    from peft_adapt.testing.tiny_models import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "llama", seed=5)
    make_lora(other, tmp_path / "c", 4, ["q_proj"], seed=3)
    two_adapters.import_peft(tmp_path / "c", base=str(other), name="c-other-base")
    with pytest.raises(UserInputError, match="only adapters of one base can be merged"):
        combine_adapters(two_adapters, ["a", "c-other-base"], "linear", "bad")
    with pytest.raises(UserInputError, match="1 weights for 2 adapters"):
        combine_adapters(two_adapters, ["a", "b"], "linear", "bad", weights=[1.0])


def test_merge_cli_registers_the_new_adapter(two_adapters, capsys):
    root = str(two_adapters.root)
    assert main(["merge", "a", "b", "--method", "ties", "--density", "0.3", "--weights", "1,1", "--name", "cli-ties",
                 "--registry", root]) == 0
    assert "registered cli-ties@1" in capsys.readouterr().out
    assert main(["merge", "a", "b", "--method", "ties", "--weights", "1", "--name", "x", "--registry", root]) == 2


# ---- export into the base


def test_fp32_export_equals_the_unmerged_model_and_loads_with_transformers_alone(tmp_path, tiny_llama, two_adapters):
    from transformers import AutoModelForCausalLM

    report = export_model(two_adapters, "b", tmp_path / "out", dtype="fp32", fidelity="logits")
    assert report["variants"]["export_fp32"]["max_abs_logit_diff"] < 1e-5
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and not (tmp_path / "out" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__module__.startswith("transformers.")
    rt = AdapterRuntime(str(tiny_llama), quantization="none", registry=two_adapters)
    ids = rt.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        exported = model(**ids).logits
    real = ids["attention_mask"].bool()  # padded positions hold no prediction to compare
    assert (exported - rt.logits(TEXTS, adapters="b"))[real].abs().max() < 1e-5
    assert json.loads((tmp_path / "out" / "fidelity.json").read_text())["variants"] == report["variants"]


def test_qlora_export_agrees_with_the_unmerged_nf4_model_as_well_as_the_noise_floor(tmp_path, tiny_llama, docs_file):
    from conftest import causal_recipe

    from peft_adapt import parse_recipe, train_domain

    result = train_domain(parse_recipe(causal_recipe(tiny_llama, docs_file, "nf4", max_steps=20)), "docs", tmp_path / "run")
    registry = Registry(tmp_path / "reg")
    registry.add(result.out_dir)
    default = export_model(registry, "t-docs", tmp_path / "dequantized", dtype="fp32", probe=docs_file,
                           fidelity="logits")
    original = export_model(registry, "t-docs", tmp_path / "original", dtype="fp32", base_weights="original",
                            probe=docs_file, fidelity="logits")
    floor = default["noise_floor"]["top1_agreement"]
    assert default["variants"]["export_fp32"]["top1_agreement"] >= floor - 0.005
    below = [v for v, s in default["variants"].items() if s["top1_agreement"] < floor]
    assert [w.split(":")[0] for w in default["warnings"]] == below  # a warning exactly where it falls below
    # folding into the original weights departs further from what was trained
    assert (original["variants"]["export_fp32"]["mean_abs_logit_diff"]
            > default["variants"]["export_fp32"]["mean_abs_logit_diff"])


def test_requantized_export_reports_what_it_cost(tmp_path, two_adapters):
    report = export_model(two_adapters, "a", tmp_path / "q", dtype="fp32", requantize="nf4", fidelity="logits")
    assert set(report["variants"]) == {"export_fp32", "requantized_nf4"}
    assert report["variants"]["requantized_nf4"]["mean_abs_logit_diff"] > report["variants"]["export_fp32"]["mean_abs_logit_diff"]
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["load_in_4bit"]


def test_methods_that_cannot_be_folded_are_refused_with_the_reason(tmp_path, two_adapters):
    entry = two_adapters.get("a")
    folder = tmp_path / "fake-bottleneck"
    import shutil

    shutil.copytree(entry.path, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(manifest | {"method": "bottleneck"}))
    two_adapters.add(folder, name="bottleneck-like")
    with pytest.raises(UserInputError, match="cannot be exported into base weights: a bottleneck adapter adds new layers"):
        export_model(two_adapters, "bottleneck-like", tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_adapter_only_export_for_vllm_pads_the_rank_on_request(tmp_path, tiny_llama, two_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    warnings = export_adapter_folder(two_adapters, "a", tmp_path / "as-is")  # rank 4: not a vLLM rank
    assert any("rank 4 is not one vLLM accepts" in w and "--pad-rank" in w for w in warnings)
    assert export_adapter_folder(two_adapters, "a", tmp_path / "padded", pad_rank=True) == []
    config = json.loads((tmp_path / "padded" / "adapter_config.json").read_text())
    assert config["r"] == 8
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    logits = []
    for folder in ("as-is", "padded"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / folder).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert (logits[0] - logits[1]).abs().max() < 1e-5
    assert two_adapters.add(tmp_path / "padded", name="padded-again").version == 1  # its manifest's checksums hold


def test_an_export_below_the_noise_floor_is_warned_about():
    from peft_adapt.merge.fidelity import fidelity_warnings

    floor = {"top1_agreement": 0.983}
    variants = {"export_bf16": {"top1_agreement": 0.978}, "requantized_nf4": {"top1_agreement": 0.990}}
    warnings = fidelity_warnings(variants, floor, "bf16")
    assert len(warnings) == 1 and "export_bf16: top-1 agreement 97.8% is below the noise floor's 98.3%" in warnings[0]
    assert "--dtype fp32" in warnings[0]
    assert fidelity_warnings({"export_fp32": {"top1_agreement": 0.993}}, floor, "fp32") == []
    on_int8 = fidelity_warnings({"export_fp32": {"top1_agreement": 0.95}}, {"top1_agreement": 0.992}, "fp32",
                                quantization="int8")
    assert len(on_int8) == 1 and "also round activations" in on_int8[0] and "serve the adapter on the int8" in on_int8[0]


def test_a_merge_holds_one_dense_delta_at_a_time(two_adapters, monkeypatch):
    """The merged delta of every module at once would be the base's size in fp32 (70B: 280 GB): each module is
    re-compressed before the next is computed."""
    sizes = []
    original = LORA.from_deltas

    def recording(deltas, rank, head):
        sizes.append(len(deltas))
        return original(deltas, rank, head)

    monkeypatch.setattr(LORA, "from_deltas", recording)
    entry = combine_adapters(two_adapters, ["a", "b"], "ties", "one-at-a-time", density=0.5)
    assert sizes == [1] * len(LORA.read(entry.path).sites) and len(sizes) == 6


# ---- GPT-2: Conv1D layers (weights stored [in, out]) through registry, runtime and export (issue 32)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from peft_adapt.testing.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2", "gpt2")


def test_a_gpt2_lora_imports_serves_mixed_and_exports_as_plain_peft_computes(tmp_path, tiny_gpt2):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    targets = ["c_attn", "c_proj", "c_fc"]  # Conv1D, every one
    folders = [make_lora(tiny_gpt2, tmp_path / f"g{i}", 4, targets, seed=i) for i in range(2)]
    registry = Registry(tmp_path / "reg")
    for i, folder in enumerate(folders):
        registry.import_peft(folder, base=str(tiny_gpt2), name=f"g{i}")  # the fit check read Conv1D as [out, in]
    rt = AdapterRuntime(str(tiny_gpt2), quantization="none", registry=registry)
    ids = rt.tokenizer(TEXTS, return_tensors="pt", padding=True)
    real = ids["attention_mask"].bool()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2), folders[0]).eval()
    with torch.no_grad():
        expected = plain(**ids).logits
    assert (rt.logits(TEXTS, adapters="g0") - expected)[real].abs().max() < 1e-4
    names = ["g0", None, "g1", "g0"]
    mixed = rt.logits(TEXTS, adapters=names)
    for i, name in enumerate(names):
        n = int(real[i].sum())
        assert (mixed[i, :n] - rt.logits([TEXTS[i]], adapters=name)[0]).abs().max() < 1e-5
    report = export_model(registry, "g0", tmp_path / "out", dtype="fp32", fidelity="logits")
    assert report["variants"]["export_fp32"]["max_abs_logit_diff"] < 1e-4
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(**ids).logits
    assert (exported - expected)[real].abs().max() < 1e-4


def test_a_gpt2_adapter_trained_on_nf4_exports_as_close_as_the_noise_floor(tmp_path, tiny_gpt2, docs_file):
    from conftest import causal_recipe

    from peft_adapt import parse_recipe, train_domain

    recipe = causal_recipe(tiny_gpt2, docs_file, "nf4", max_steps=10)
    result = train_domain(parse_recipe(recipe), "docs", tmp_path / "run")
    registry = Registry(tmp_path / "reg")
    registry.add(result.out_dir)
    report = export_model(registry, "t-docs", tmp_path / "out", dtype="fp32", probe=docs_file, fidelity="logits")
    assert report["variants"]["export_fp32"]["top1_agreement"] >= report["noise_floor"]["top1_agreement"] - 0.005
    served = AdapterRuntime(str(tiny_gpt2), quantization="nf4", registry=registry)
    assert served.generate(["def add(a, b):"], adapters="t-docs", max_new_tokens=4)[0] is not None


def _snippet(folder) -> dict:
    """Run the Python block of an exported classifier's README, as a user would paste it."""
    card = (folder / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(code.replace("'FOLDER'", repr(str(folder))), namespace)
    return namespace


@pytest.mark.parametrize("pooling, base", [("cls", "tiny_bert"), ("last", "tiny_llama")])
def test_a_classifier_exports_to_an_automodel_folder_that_its_cards_snippet_runs_as_served(tmp_path, sentiment_file,
                                                                                         request, pooling, base):
    from conftest import classification_recipe

    from peft_adapt import parse_recipe, train_domain

    model = request.getfixturevalue(base)
    data = classification_recipe(model, sentiment_file, max_steps=10)
    data["task"]["pooling"] = pooling
    registry = Registry(tmp_path / "reg")
    registry.add(train_domain(parse_recipe(data), "sentiment", tmp_path / "run").out_dir, name="sentiment")
    report = export_model(registry, "sentiment", tmp_path / "out", dtype="fp32", fidelity="logits")
    assert report["label_agreement"] == 1.0 and report["max_abs_prob_diff"] < 1e-5, report
    texts = ["good great fine", "awful broken sad and slow", "fine"]
    served = AdapterRuntime(str(model), task="classification", quantization="none", registry=registry).classify(
        texts, "sentiment")
    found = _snippet(tmp_path / "out")["classify"](texts)
    for mine, theirs in zip(found, served):
        assert mine["label"] == theirs["label"]
        assert max(abs(a - b) for a, b in zip(mine["probs"].values(), theirs["probs"].values())) < 1e-5
    assert not (tmp_path / "out" / "adapter_config.json").exists()
