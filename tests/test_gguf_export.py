"""GGUF export for llama.cpp: the folded model and the GGUF LoRA, read back by transformers and run by llama.cpp
itself (llama-cpp-python, which `make test` installs) against the adapter as served; a GGUF file as a base; the
refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import causal_recipe
from test_runtime import make_lora

from peft_adapt import Registry, UserInputError, export_model, parse_recipe, train_domain
from peft_adapt.cli.main import main
from peft_adapt.merge.gguf_export import export_gguf
from peft_adapt.runtime import AdapterRuntime
from peft_adapt.testing.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def gguf_registry(tmp_path_factory, tiny_llama, docs_file):
    """A random LoRA on Q, K, V and up_proj (large effect; Q and K rows are reordered for llama.cpp) and a LoRA
    trained for a few steps on the nf4 base."""
    root = tmp_path_factory.mktemp("gguf")
    registry = Registry(root / "reg")
    registry.import_peft(make_lora(tiny_llama, root / "lora", 4, ["q_proj", "k_proj", "v_proj", "up_proj"], seed=1),
                         base=str(tiny_llama), name="lora")
    recipe = causal_recipe(tiny_llama, docs_file, "nf4", max_steps=6, learning_rate=3e-2)
    registry.add(train_domain(parse_recipe(recipe), "docs", root / "trained").out_dir, name="nf4-lora")
    return root, registry


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2", "gpt2")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_gguf_model_reads_back_as_the_safetensors_export(gguf_registry, tmp_path):
    """transformers reads the GGUF file (undoing llama.cpp's Q/K row order by its own rules) into the same weights as
    the fp32 safetensors export; q8_0 quantizes the matrices and keeps norms f32."""
    import gguf
    from transformers import AutoModelForCausalLM

    _, registry = gguf_registry
    report = export_gguf(registry, "lora", tmp_path / "f32")
    assert report["modules"] == 8 and report["adapter_kept_min"] == 1.0
    export_model(registry, "lora", tmp_path / "st", dtype="fp32")
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    expected = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "st"), ids)
    found = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "f32", gguf_file="model.gguf"), ids)
    assert (found - expected).abs().max() < 1e-5
    base = _logits(AutoModelForCausalLM.from_pretrained(registry.get("lora").manifest.base_model), ids)
    assert (base - expected).abs().max() > 0.1  # the adapter is in there

    report = export_gguf(registry, "lora", tmp_path / "q8", outtype="q8_0")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "q8" / "model.gguf")).tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert 0.9 < report["adapter_kept_min"] < 1.0  # measured through q8_0's own rounding
    assert (tmp_path / "q8" / "Modelfile").read_text() == "FROM ./model.gguf\n"


def test_a_gguf_file_is_a_base(gguf_registry, tmp_path):
    """The round trip: an exported GGUF named as a base (`base: {model: model.gguf}`) computes what it was exported
    from."""
    from transformers import AutoModelForCausalLM

    _, registry = gguf_registry
    export_gguf(registry, "lora", tmp_path / "gg", fidelity="none")
    export_model(registry, "lora", tmp_path / "st", dtype="fp32", fidelity="none")
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    runtime = AdapterRuntime(str(tmp_path / "gg" / "model.gguf"), quantization="none", device="cpu")
    served = runtime.logits(ids, adapters=None)
    expected = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "st"), ids)
    assert (served - expected).abs().max() < 1e-4
    assert runtime.tokenizer("def main():")["input_ids"] == registry_tokenizer(registry)("def main():")["input_ids"]


def registry_tokenizer(registry):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(registry.get("lora").manifest.base_model)


@pytest.mark.parametrize("ref", ["lora", "nf4-lora"])
def test_llama_cpp_runs_the_exports_as_served(gguf_registry, tmp_path, ref):
    """llama.cpp itself runs model.gguf, and base + adapter.gguf, as the runtime serves the adapter: at the noise
    floor (llama.cpp on the base as training saw it against the base as served)."""
    pytest.importorskip("llama_cpp")
    from peft_adapt.merge.gguf_fidelity import llama_cpp_logits

    _, registry = gguf_registry
    model = export_gguf(registry, ref, tmp_path / "model", fidelity="logits", probe_tokens=256)
    adapter = export_gguf(registry, ref, tmp_path / "adapter", adapter_only=True, with_base=True,
                          fidelity="logits", probe_tokens=256)
    floor = model["noise_floor"]["top1_agreement"]
    scores = list(model["variants"].values()) + list(adapter["variants"].values())
    assert len(scores) == 2  # base.gguf is f32: it is the base f32 run
    for score in scores:
        assert score["top1_agreement"] >= floor - 0.01, (model, adapter)
    if ref == "lora":  # no quantization anywhere: the same numbers to float rounding
        assert floor == 1.0
        assert max(s["max_abs_logit_diff"] for s in scores) < 1e-3
    assert model["tokenization"]["texts_tokenized_alike"] == 1.0
    assert model["warnings"] == [] and adapter["warnings"] == []
    # the adapter changes what llama.cpp computes: the base file alone is far from the adapted model
    ids = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(2))
    base_only = llama_cpp_logits(tmp_path / "adapter" / "base.gguf", ids)
    with_lora = llama_cpp_logits(tmp_path / "adapter" / "base.gguf", ids, tmp_path / "adapter" / "adapter.gguf")
    folded = llama_cpp_logits(tmp_path / "model" / "model.gguf", ids)
    assert (with_lora - folded).abs().max() < 0.1 * (base_only - folded).abs().max()


def test_cli_exports_gguf_and_writes_the_modelfile(gguf_registry, tmp_path, capsys):
    root, _ = gguf_registry
    code = main(["export", "lora", "--format", "gguf", "--adapter-only", "--out", str(tmp_path / "out"),
                 "--registry", str(root / "reg")])
    assert code == 0
    out = capsys.readouterr().out
    assert "saved adapter.gguf (f32)" in out
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert modelfile.splitlines()[1] == "ADAPTER ./adapter.gguf"
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "out" / "adapter.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b", "blk.1.ffn_up.weight.lora_b"} <= names
    # an option of the other format is refused, not ignored
    registry = ["--registry", str(root / "reg")]
    assert main(["export", "lora", "--format", "gguf", "--dtype", "fp32", "--out", str(tmp_path / "x"), *registry]) == 2
    assert "--dtype does not apply to --format gguf" in capsys.readouterr().err
    assert main(["export", "lora", "--outtype", "q8_0", "--out", str(tmp_path / "y"), *registry]) == 2
    assert "--outtype does not apply to --format safetensors" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_refusals_name_the_problem(gguf_registry, tmp_path, tiny_gpt2, docs_file):
    root, registry = gguf_registry
    recipe = causal_recipe(Path(registry.get("lora").manifest.base_model), docs_file, "none", max_steps=1)
    recipe["adapter"] = {"method": "bottleneck", "bottleneck_size": 8}
    registry.add(train_domain(parse_recipe(recipe), "docs", root / "bottleneck").out_dir, name="bottleneck")
    with pytest.raises(UserInputError, match="llama.cpp's adapters .--lora. are LoRA"):
        export_gguf(registry, "bottleneck", tmp_path / "a", adapter_only=True)
    registry.import_peft(make_lora(tiny_gpt2, root / "gpt2-lora", 4, ["c_attn"], seed=3), base=str(tiny_gpt2),
                         name="gpt2")
    with pytest.raises(UserInputError, match="GGUF export writes llama, mistral models"):
        export_gguf(registry, "gpt2", tmp_path / "b")
    with pytest.raises(UserInputError, match="--with-base goes with --adapter-only"):
        export_gguf(registry, "lora", tmp_path / "c", with_base=True)
    assert not any((tmp_path / n).exists() for n in "abc")  # a refusal writes nothing


def test_a_file_that_is_not_gguf_is_refused_as_a_base(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(UserInputError, match="cannot read this GGUF file"):
        AdapterRuntime(str(bad), quantization="none", device="cpu")



def test_a_gguf_base_trains_and_exports_back_to_gguf(gguf_registry, tmp_path, docs_file):
    """The round trip from a GGUF base: train on `base: {model: base.gguf}`, export again; the export copies the
    tokenizer from that file, and llama.cpp runs the original file + the new LoRA as the runtime serves it."""
    pytest.importorskip("llama_cpp")
    import gguf

    _, registry = gguf_registry
    export_gguf(registry, "lora", tmp_path / "first", fidelity="none")
    source = tmp_path / "first" / "model.gguf"
    recipe = causal_recipe(source, docs_file, "none", max_steps=4, learning_rate=3e-2)
    registry.add(train_domain(parse_recipe(recipe), "docs", tmp_path / "trained").out_dir, name="on-gguf")
    report = export_gguf(registry, "on-gguf", tmp_path / "second", adapter_only=True, fidelity="logits",
                         probe_tokens=256)
    original = next(v for k, v in report["variants"].items() if "the GGUF the base came from" in k)
    assert original["top1_agreement"] >= report["noise_floor"]["top1_agreement"] - 0.01
    assert original["max_abs_logit_diff"] < 1e-3  # an f32 file: the base as served, to float rounding
    assert report["tokenization"]["texts_tokenized_alike"] == 1.0
    fields = gguf.GGUFReader(str(source)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert (tmp_path / "second" / "Modelfile").read_text().splitlines()[0] == f"FROM {source}"
