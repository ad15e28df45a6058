"""A quantized base from a bf16 checkpoint keeps its embeddings and LM head in bf16 and computes exactly as when they
were upcast whole; training, serving and export agree on the quantized weights it holds."""

from __future__ import annotations

import pytest
import torch
from conftest import causal_recipe
from test_runtime import TEXTS

from peft_adapt import AdapterRuntime, Registry, parse_recipe, train_domain
from peft_adapt.merge.dequantize import QuantizedLayout, dequantized_weight
from peft_adapt.models.backbone import BaseSpec, load_backbone
from peft_adapt.models.half_storage import HalfStoredLinear
from peft_adapt.models.shards import Checkpoint


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("bf16") / "tiny-llama-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    return out


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_embeddings_and_head_stay_bf16_and_compute_as_if_upcast(bf16_llama, quantization):
    model = load_backbone(BaseSpec(model=str(bf16_llama), quantization=quantization, device="cpu")).model.eval()
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert type(model.lm_head) is HalfStoredLinear and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32  # norms compute in fp32, as before
    ids = torch.tensor([[5, 17, 99, 3, 250, 8]])
    with torch.no_grad():
        half = model(input_ids=ids).logits
        # the same model with the two upcast whole (what loading in fp32 used to hold)
        model.get_input_embeddings().weight.data = model.get_input_embeddings().weight.data.float()
        model.lm_head.weight.data = model.lm_head.weight.data.float()
        whole = model(input_ids=ids).logits
    assert half.dtype == torch.float32 and torch.equal(half, whole)


def test_head_blocks_give_the_full_product(monkeypatch):
    from peft_adapt.models import half_storage

    monkeypatch.setattr(half_storage, "HEAD_ROWS", 7)  # several blocks and a ragged last one
    head = torch.nn.Linear(16, 30, bias=True).to(torch.bfloat16)
    full = torch.nn.functional.linear(x := torch.randn(2, 3, 16), head.weight.float(), head.bias.float())
    head.__class__ = HalfStoredLinear
    torch.testing.assert_close(head(x), full, rtol=1e-6, atol=1e-6)


def test_export_dequantizes_what_the_bf16_loaded_nf4_layer_holds(bf16_llama):
    assert Checkpoint(bf16_llama).float_dtype == torch.bfloat16
    model = load_backbone(BaseSpec(model=str(bf16_llama), quantization="nf4", device="cpu")).model
    layout, checkpoint = QuantizedLayout(bf16_llama, "nf4"), Checkpoint(bf16_llama)
    compared = 0
    for name, module in model.named_modules():
        loaded = dequantized_weight(module)
        if loaded is not None:
            key = f"{name}.weight"
            assert torch.equal(layout.dequantize(key, checkpoint.read(key)).float(), loaded), key
            compared += 1
    assert compared == 14  # 7 linear layers in each of 2 blocks


def test_training_and_serving_a_bf16_checkpoint_on_nf4(tmp_path, bf16_llama, docs_file):
    result = train_domain(parse_recipe(causal_recipe(bf16_llama, docs_file, "nf4", max_steps=3)), "docs", tmp_path)
    registry = Registry(tmp_path / "reg")
    entry = registry.add(result.out_dir)
    runtime = AdapterRuntime(str(bf16_llama), quantization="nf4", registry=registry)
    logits = runtime.logits(TEXTS, adapters=entry.ref)
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits, runtime.logits(TEXTS, adapters=None))  # the adapter acts
