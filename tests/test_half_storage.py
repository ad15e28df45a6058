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


LOAD = """
import json, sys, torch
from pathlib import Path
torch.set_num_threads(1)
import transformers, bitsandbytes, accelerate, transformers.models.llama.modeling_llama
from peft_adapt.models.backbone import BaseSpec, load_backbone

def status(field):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(field + ":"))) * 1024

import threading, time
before = {f: status(f) for f in ("VmRSS", "RssFile", "RssAnon")}
anon_peak, loading = [0], [True]

def sample():  # the kernel keeps no peak of anonymous memory alone: read it often
    while loading[0]:
        anon_peak[0] = max(anon_peak[0], status("RssAnon"))
        time.sleep(0.002)

sampler = threading.Thread(target=sample)
sampler.start()
Path("/proc/self/clear_refs").write_text("5")
backbone = load_backbone(BaseSpec(model=sys.argv[1], quantization="nf4", device="cpu"))
loading[0] = False
sampler.join()
print(json.dumps({"idle": status("VmRSS") - before["VmRSS"], "peak": status("VmHWM") - before["VmRSS"],
                  "anon_peak": anon_peak[0] - before["RssAnon"], "file": status("RssFile") - before["RssFile"]}))
"""


def test_a_loaded_nf4_base_holds_no_mapped_checkpoint_and_loading_peaks_near_what_it_holds(tmp_path):
    """A 0.12B Llama in bf16 (238 MB): transformers left the embeddings as views into the mapped checkpoint, which kept
    every page loading read resident, and loading in fp32 peaked at 3x what the model then held (measured). While it
    loads, the pages of the mapped checkpoint count in the process's peak too (page cache, which the kernel takes back
    under pressure); the memory of its own, anonymous, must peak near what the model holds afterwards."""
    import json
    import subprocess
    import sys

    from peft_adapt.testing.tiny_models import build_random_llama

    base = build_random_llama(tmp_path / "llama", "0.15b")
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    done = subprocess.run([sys.executable, "-c", LOAD, str(base)], capture_output=True, text=True, check=True)
    held = json.loads(done.stdout.strip().splitlines()[-1])
    assert held["file"] < 0.1 * size, held  # the checkpoint is no longer mapped
    assert held["anon_peak"] <= 1.5 * held["idle"], held
    assert held["idle"] < 0.9 * size, held  # nf4 layers and bf16 embeddings: less than the checkpoint itself
