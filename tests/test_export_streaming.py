"""Export streams the checkpoint tensor by tensor: the same bits as folding the whole model in memory, memory bounded
by one tensor, and a broken checkpoint is one clear error that leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_runtime import make_lora

from peft_adapt import Registry, UserInputError, export_model
from peft_adapt.merge.dequantize import dequantized_weight
from peft_adapt.methods import method
from peft_adapt.models.backbone import BaseSpec, disable_cpu_repacking, load_backbone
from peft_adapt.models.shards import Checkpoint, ShardWriter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_ia3(base: Path, out: Path, seed: int) -> Path:
    """A peft (IA)3 folder with random vectors: attention outputs scaled by rows, the MLP's down_proj by columns."""
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False,
        task_type="CAUSAL_LM"))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("streamed")
    registry = Registry(root / "reg")
    registry.import_peft(make_lora(tiny_llama, root / "lora", 4, ["q_proj", "v_proj", "up_proj"], seed=1),
                         base=str(tiny_llama), name="lora")
    registry.import_peft(make_ia3(tiny_llama, root / "ia3", seed=2), base=str(tiny_llama), name="ia3")
    return root, registry


def in_memory_export(base: Path, ref_folder: Path, method_name: str, quantization: str, dtype: str, out: Path) -> Path:
    """The export as it was before it streamed: the whole model in fp32, the quantized layers dequantized from a
    loaded quantized copy, the adapter folded, the model cast and saved by transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if quantization != "none":
        quantized = load_backbone(BaseSpec(model=str(base), quantization=quantization, device="cpu")).model
        disable_cpu_repacking(quantized)
        for name, module in quantized.named_modules():
            weight = dequantized_weight(module)
            if weight is not None:
                state[f"{name}.weight"] = weight
    adapting = method(method_name)
    for path, site in adapting.read(ref_folder).sites.items():
        adapting.fold(state, path, site)
    model.load_state_dict(state)
    model.to(DTYPES[dtype])
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("quantization", ["nf4", "int8", "none"])
@pytest.mark.parametrize("adapter", ["lora", "ia3"])
def test_streamed_export_equals_the_in_memory_export_bit_for_bit(exports, tiny_llama, quantization, adapter):
    from peft_adapt.merge.export import write_folded

    root, registry = exports
    folder = registry.get(adapter).path  # folded as if trained on `quantization`: into what that training saw
    dtype = "bf16" if adapter == "lora" else "fp16"
    expected = load_file(in_memory_export(tiny_llama, folder, adapter, quantization, dtype,
                                          root / f"memory-{adapter}-{quantization}") / "model.safetensors")
    out = root / f"streamed-{adapter}-{quantization}"
    out.mkdir()
    write_folded(tiny_llama, method(adapter).read(folder), quantization, "dequantized", dtype, out)
    found = load_file(out / "model.safetensors")
    assert set(found) == set(expected)
    for key in expected:
        assert found[key].dtype == expected[key].dtype, key
        assert torch.equal(found[key], expected[key]), key
    changed = [k for k in expected if not torch.equal(expected[k], load_file(tiny_llama / "model.safetensors")[k]
                                                      .to(DTYPES[dtype]))]
    assert changed, "the adapter and the dequantization must change some weights, or this test shows nothing"


def test_export_of_a_registered_adapter_loads_with_transformers_and_reports_what_bf16_keeps(exports, tiny_llama):
    from transformers import AutoModelForCausalLM

    root, registry = exports
    report = export_model(registry, "lora", root / "bf16", dtype="bf16", max_shard_size="40KB")
    shards = sorted(p.name for p in (root / "bf16").glob("*.safetensors"))
    assert len(shards) > 2 and (root / "bf16" / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(root / "bf16")
    assert model.dtype == torch.bfloat16
    on_disk = json.loads((root / "bf16" / "fidelity.json").read_text())
    assert on_disk["fidelity"] == "weights" and on_disk["modules"] == 6  # q, v, up in 2 layers
    assert 0.9 < report["adapter_kept_min"] < 1.0  # bf16 rounds a little of it away
    fp32 = export_model(registry, "lora", root / "fp32", dtype="fp32", fidelity="weights")
    assert fp32["adapter_kept_min"] == 1.0 and fp32["warnings"] == []
    export_model(registry, "lora", root / "quiet", fidelity="none")
    with pytest.raises(UserInputError, match="shard size '2 bananas'"):
        export_model(registry, "lora", root / "never", max_shard_size="2 bananas")
    assert not (root / "never").exists()
    assert not (root / "quiet" / "fidelity.json").exists()


def test_shard_writer_output_reads_back_with_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).bfloat16(),
               "d": torch.zeros(0, 3)}
    writer = ShardWriter(tmp_path, [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()], max_shard_bytes=64)
    for key, tensor in tensors.items():
        writer.write(key, tensor)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    read = {}
    for shard in set(index["weight_map"].values()):
        read |= load_file(tmp_path / shard)
    assert set(read) == set(tensors) and all(torch.equal(read[k], tensors[k]) for k in tensors)


def _sharded_copy(base: Path, out: Path) -> Path:
    """The base saved in several shards (a model's usual layout), with its tokenizer and config."""
    import shutil

    from transformers import AutoModelForCausalLM

    shutil.copytree(base, out)
    (out / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(out, max_shard_size="40KB")
    return out


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage header"])
def test_a_broken_checkpoint_shard_is_one_clear_error_and_leaves_no_output(tmp_path, exports, tiny_llama, damage):
    root, registry = exports
    base = _sharded_copy(tiny_llama, tmp_path / "base")
    local = Registry(tmp_path / "reg")
    local.import_peft(registry.get("lora").path, base=str(base), name="lora")
    shard = sorted(base.glob("model-*.safetensors"))[1]
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 100])
    else:
        shard.write_bytes(b"\xff" * 64)
    with pytest.raises(UserInputError, match=rf"checkpoint shard {shard}.*(missing|truncated|not a whole).*again"):
        export_model(local, "lora", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_export_refuses_a_folder_without_safetensors(tmp_path, tiny_llama):
    base = tmp_path / "pickled"
    base.mkdir()
    (base / "config.json").write_text((tiny_llama / "config.json").read_text())
    with pytest.raises(UserInputError, match="holds no model.safetensors.*safe_serialization"):
        Checkpoint(base)


PEAK = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    torch.set_num_threads(1)
    from peft_adapt import Registry
    from peft_adapt.merge.export import write_folded
    from peft_adapt.methods import method
    import transformers, bitsandbytes, accelerate, safetensors.torch, transformers.models.llama.modeling_llama
    def status(field):
        return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(field + ":")))
    baseline = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak so far (the imports' own) is forgotten: VmHWM = VmRSS
    entry = Registry(sys.argv[1]).get("wide")
    out = Path(sys.argv[2])
    out.mkdir()
    write_folded(Path(entry.manifest.base_model), method("lora").read(entry.path), "nf4", "dequantized", "bf16", out,
                 "100MB")
    print(json.dumps({"baseline_kib": baseline, "peak_kib": status("VmHWM")}))
""")


def test_streamed_export_peak_memory_is_a_fraction_of_the_model(tmp_path):
    """A ~130M-parameter Llama (525 MB in fp32) folded from nf4: the in-memory export held ~12 bytes per parameter;
    the streamed one must add less than a quarter of the fp32 model to what the interpreter holds after its imports.
    What it holds grows with the largest tensor (6.5 MB in fp32 here; bitsandbytes' quantization takes ~7x that
    while it runs), not with the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_adapt.testing.tiny_models import build_tokenizer

    base = tmp_path / "wide"
    tokenizer = build_tokenizer(320)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=640, intermediate_size=2560, num_hidden_layers=20,
                         num_attention_heads=10, num_key_value_heads=10, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(base, max_shard_size="100MB")
    tokenizer.save_pretrained(base)
    fp32_bytes = sum(p.numel() for p in model.parameters()) * 4
    del model
    registry = Registry(tmp_path / "reg")
    registry.import_peft(make_lora(base, tmp_path / "lora", 8, ["q_proj", "v_proj", "down_proj"], seed=0),
                         base=str(base), name="wide")
    result = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "reg"), str(tmp_path / "out")],
                            capture_output=True, text=True, check=True)
    peak = json.loads(result.stdout.strip().splitlines()[-1])
    added = (peak["peak_kib"] - peak["baseline_kib"]) * 1024
    assert fp32_bytes > 500e6
    print(f"added {added / 1e6:.0f} MB over the imports for a {fp32_bytes / 1e6:.0f} MB fp32 model")
    assert added < fp32_bytes / 4, (added / 1e6, fp32_bytes / 1e6)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == fp32_bytes // 2  # all of it written, in bf16


def test_export_cli_says_what_the_weights_keep_and_skips_fidelity_on_request(exports, capsys):
    from peft_adapt.cli.main import main

    root, registry = exports
    assert main(["export", "lora", "--out", str(root / "cli"), "--registry", str(registry.root)]) == 0
    assert "weights keep" in capsys.readouterr().out and (root / "cli" / "fidelity.json").exists()
    assert main(["export", "lora", "--out", str(root / "cli-quiet"), "--no-fidelity", "--registry",
                 str(registry.root)]) == 0
    assert "fidelity.json" not in capsys.readouterr().out and not (root / "cli-quiet" / "fidelity.json").exists()
    assert (root / "cli-quiet" / "model.safetensors").exists()


@pytest.mark.slow
def test_streamed_export_of_the_built_in_model_equals_the_in_memory_export(tmp_path):
    """SmolLM2-135M (tied embeddings, fp32 checkpoint) with a rank-16 LoRA on every linear layer, trained as if on
    nf4: the same tensors, names and dtypes, bit for bit."""
    from peft_adapt.merge.export import write_folded
    from peft_adapt.models.backbone import resolve_model_path
    from peft_adapt.testing.tiny_models import write_random_lora

    base = resolve_model_path("smollm2-135m")
    lora = write_random_lora(base, tmp_path / "lora", 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"], seed=0)
    expected = load_file(in_memory_export(base, lora, "lora", "nf4", "bf16", tmp_path / "memory") / "model.safetensors")
    (tmp_path / "streamed").mkdir()
    write_folded(base, method("lora").read(lora), "nf4", "dequantized", "bf16", tmp_path / "streamed")
    found = load_file(tmp_path / "streamed" / "model.safetensors")
    assert set(found) == set(expected)
    assert all(found[k].dtype == expected[k].dtype and torch.equal(found[k], expected[k]) for k in expected)


def test_export_folds_a_square_gpt2_conv1d_layer_the_right_way_round(tmp_path):
    """GPT-2 stores its Conv1D weights [in, out]: on attention's square c_proj a delta folded by name would land
    transposed and still fit every shape check; the export must equal plain peft's unmerged model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_adapt.testing.tiny_models import build_tiny_model

    base = build_tiny_model(tmp_path / "gpt2", "gpt2")
    registry = Registry(tmp_path / "reg")
    folder = make_lora(base, tmp_path / "lora", 4, ["attn.c_proj"], seed=0)
    registry.import_peft(folder, base=str(base), name="g")
    export_model(registry, "g", tmp_path / "out", dtype="fp32")
    ids = AutoTokenizer.from_pretrained(base)(["def add(a, b): return a + b"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()(ids).logits
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base)(ids).logits
    assert (exported - expected).abs().max() < 1e-4 < (plain - expected).abs().max()
