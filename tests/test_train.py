"""Training from a recipe: loss goes down on every quantization, outputs are complete, peft reads them back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import causal_recipe, classification_recipe, write_jsonl

from peft_adapt import UserInputError, parse_recipe, train_domain
from peft_adapt.models.backbone import BaseSpec, disable_cpu_repacking, load_backbone
from peft_adapt.training.evaluation import evaluate_task


def _loss_before_and_after(result) -> tuple[float, float]:
    """Loss on the training examples with the adapter off (the base) and on (the trained model)."""
    task = result.manifest.task
    pad = result.backbone.tokenizer.pad_token_id
    labels = result.manifest.labels
    num_labels = len(labels) if labels else None
    after = evaluate_task(result.model, result.data.train, task, pad, num_labels)
    if task == "causal_lm":
        with result.model.disable_adapter():
            before = evaluate_task(result.model, result.data.train, task, pad)
        return before["loss"], after["loss"]
    return None, after


@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_lora_training_lowers_causal_lm_loss(tmp_path, tiny_llama, docs_file, quantization):
    recipe = parse_recipe(causal_recipe(tiny_llama, docs_file, quantization))
    result = train_domain(recipe, "docs", tmp_path)
    before, after = _loss_before_and_after(result)
    assert after < before - 0.3, (before, after)


@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_lora_training_lowers_classification_loss(tmp_path, tiny_bert, sentiment_file, quantization):
    recipe = parse_recipe(classification_recipe(tiny_bert, sentiment_file, quantization))
    result = train_domain(recipe, "sentiment", tmp_path)
    history = json.loads((result.out_dir / "log_history.json").read_text())
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses[-1] < losses[0] - 0.2, losses
    assert result.metrics["eval"]["accuracy"] >= 0.9


def test_training_writes_adapter_manifest_metrics_and_curves(tmp_path, tiny_bert, sentiment_file):
    recipe = parse_recipe(classification_recipe(tiny_bert, sentiment_file, "nf4", max_steps=5))
    result = train_domain(recipe, "sentiment", tmp_path)
    out = result.out_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "manifest.json", "metrics.json", "loss_curve.png"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("name", "domain", "version", "method", "base", "base_fingerprint", "recipe",
                "data_sha256", "metrics", "files", "created", "library_versions", "labels"):
        assert key in manifest, key
    assert manifest["labels"] == ["negative", "positive"]
    assert manifest["base"]["quantization"] == "nf4" and "quantization" not in manifest  # the base, stored once
    from peft_adapt.models.builtin_models import sha256_file

    # every file travels checksummed: the weights, the config that says how to read them, the reports
    assert manifest["files"] == {p.name: sha256_file(p) for p in out.iterdir() if p.name != "manifest.json"}
    assert {"adapter_model.safetensors", "adapter_config.json", "metrics.json"} <= set(manifest["files"])
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / ".checkpoints").exists()


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_saved_adapter_loads_in_plain_peft_and_reproduces_our_logits(tmp_path, tiny_llama, docs_file, quantization):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    recipe = parse_recipe(causal_recipe(tiny_llama, docs_file, quantization, max_steps=5))
    result = train_domain(recipe, "docs", tmp_path)
    quant = None if quantization == "none" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
    )
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=quant, device_map="cpu" if quant else None)
    if quant:
        disable_cpu_repacking(plain)  # compare like with like: our trained model never repacks either
    plain = PeftModel.from_pretrained(plain, result.out_dir).eval()
    ids = torch.tensor([f["input_ids"] for f in result.data.eval[:2]])
    with torch.no_grad():
        ours = result.model.eval()(input_ids=ids).logits
        theirs = plain(input_ids=ids).logits
    assert torch.equal(ours, theirs)


def test_early_stopping_stops_when_the_metric_stalls(tmp_path, tiny_bert, sentiment_file):
    recipe = parse_recipe(classification_recipe(
        tiny_bert, sentiment_file, max_steps=200, eval_steps=2, early_stopping={"metric": "accuracy", "patience": 2},
        learning_rate=0.0001,
    ))
    result = train_domain(recipe, "sentiment", tmp_path)
    assert result.metrics["steps"] < 200


@pytest.mark.parametrize("mode, trains", [
    ("all", {"classifier"}),
    ("none", {"encoder.embeddings", "encoder.encoder.layer.0", "encoder.encoder.layer.1", "classifier"}),
    ("bottom:1", {"encoder.encoder.layer.1", "classifier"}),
])
def test_freeze_modes_train_exactly_the_named_parts(tmp_path, tiny_bert, sentiment_file, mode, trains):
    data = classification_recipe(tiny_bert, sentiment_file, max_steps=3)
    data.pop("adapter")
    data["freeze"] = mode
    result = train_domain(parse_recipe(data), "sentiment", tmp_path)
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert {n for n in trained if not any(n.startswith(t) for t in trains)} == set()
    assert all(any(n.startswith(t) for n in trained) for t in trains)
    assert result.manifest.method in ("head_only", "full", "partial_bottom1")
    assert (result.out_dir / "trained_weights.safetensors").is_file()


def test_freezing_a_quantized_backbone_for_full_fine_tuning_is_refused(tiny_bert, sentiment_file):
    data = classification_recipe(tiny_bert, sentiment_file, "nf4")
    data.pop("adapter")
    data["freeze"] = "none"
    with pytest.raises(Exception, match="freeze: none trains backbone weights, which a nf4 base cannot"):
        parse_recipe(data)


# ---- the AVX512-BF16 repacking trap (DESIGN.md, "Known traps")


def _has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def _lora_gradients_after(tiny_llama, eval_forward_first: bool) -> list:
    from peft import LoraConfig, get_peft_model

    backbone = load_backbone(BaseSpec(model=str(tiny_llama), quantization="nf4"))
    model, ids = backbone.model, torch.tensor([[5, 6, 7, 8, 9, 10]])
    if eval_forward_first:
        model.eval()
        with torch.no_grad():
            model(ids)
    else:
        disable_cpu_repacking(model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    try:
        model(ids, labels=ids).loss.backward()
    except RuntimeError:  # the other face of the trap: the backward itself fails
        return []
    return [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A starts with zero grad (B = 0)


@pytest.mark.skipif(not _has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_the_trap_exists_after_an_eval_forward_lora_gets_no_gradient(tiny_llama):
    """Documents the bitsandbytes behaviour that the training path guards against."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that gemv_4bit has no autograd kernel
        broken = _lora_gradients_after(tiny_llama, eval_forward_first=True)
    assert not any(g is not None and g.abs().sum() > 0 for g in broken)
    guarded = _lora_gradients_after(tiny_llama, eval_forward_first=False)
    assert guarded and all(g is not None and g.abs().sum() > 0 for g in guarded)


@pytest.mark.skipif(not _has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_a_model_that_already_ran_inference_is_refused_for_training(tiny_llama):
    backbone = load_backbone(BaseSpec(model=str(tiny_llama), quantization="nf4"))
    backbone.model.eval()
    with torch.no_grad():
        backbone.model(torch.tensor([[5, 6, 7]]))
    with pytest.raises(RuntimeError, match="already repacked for CPU inference.*Load the model again"):
        disable_cpu_repacking(backbone.model)


def test_training_with_evaluations_between_steps_survives_on_nf4(tmp_path, tiny_llama, docs_file):
    """Eval-mode forwards run between training steps; on AVX512-BF16 CPUs they used to repack the weights."""
    recipe = parse_recipe(causal_recipe(tiny_llama, docs_file, "nf4", max_steps=12, eval_steps=3))
    result = train_domain(recipe, "docs", tmp_path)
    history = json.loads((result.out_dir / "log_history.json").read_text())
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    assert len(evals) == 4 and evals[-1] < evals[0]
    packed = [m for m in result.model.modules() if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]
    assert packed == []


# ---- resuming, experiment logs, chat data, no eval split


def _run_cli(tmp_path: Path, recipe: dict, *flags: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "peft_adapt.cli", "train", str(path), "--no-register", *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ | (env or {}))


@pytest.mark.parametrize("method", ["lora", "bottleneck"])
def test_an_interrupted_run_resumed_gives_the_adapter_of_an_uninterrupted_one(tmp_path, tiny_llama, docs_file, method):
    from safetensors.torch import load_file

    recipe = causal_recipe(tiny_llama, docs_file, "nf4", max_steps=8, checkpoint_steps=3, threads=1, learning_rate=5e-3)
    if method == "bottleneck":
        recipe["adapter"] = {"method": "bottleneck", "reduction_factor": 8}
    whole = _run_cli(tmp_path, recipe, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _run_cli(tmp_path, recipe, "--out", str(tmp_path / "cut"), env={"PEFT_ADAPT_CRASH_AT": "checkpoint-6"})
    assert killed.returncode != 0 and not (tmp_path / "cut" / "docs").exists()  # died after checkpoint 6, unsaved
    resumed = _run_cli(tmp_path, recipe, "--out", str(tmp_path / "cut"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = json.loads((tmp_path / "cut" / "docs" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 6 and metrics["steps"] == 8
    expected = load_file(tmp_path / "whole" / "docs" / "adapter_model.safetensors")
    found = load_file(tmp_path / "cut" / "docs" / "adapter_model.safetensors")
    assert expected.keys() == found.keys()
    for key in expected:
        assert torch.allclose(expected[key], found[key], atol=1e-6), key
    assert not (tmp_path / "cut" / ".docs.checkpoints").exists()  # removed once the adapter is saved
    if method == "lora":  # the CLI's step, the same for every method
        again = _run_cli(tmp_path, recipe, "--out", str(tmp_path / "cut"), "--resume")  # nothing left to do
        assert again.returncode == 0 and "already trained" in again.stdout


def test_report_to_tensorboard_writes_event_files_offline(tmp_path, tiny_bert, sentiment_file):
    pytest.importorskip("tensorboard")
    recipe = parse_recipe(classification_recipe(tiny_bert, sentiment_file, max_steps=4, logging_steps=1,
                                                report_to="tensorboard"))
    train_domain(recipe, "sentiment", tmp_path)
    events = list((tmp_path / "logs" / "sentiment").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert len(accumulator.Scalars("train/loss")) >= 3


def test_eval_fraction_0_trains_on_every_row_and_evaluates_nothing(tmp_path, tiny_bert, sentiment_file):
    data = classification_recipe(tiny_bert, sentiment_file, max_steps=3)
    data["task"]["eval_fraction"] = 0
    result = train_domain(parse_recipe(data), "sentiment", tmp_path)
    assert result.metrics["rows"] == {"train": 96, "eval": 0} and "eval" not in result.metrics
    data["training"]["early_stopping"] = {"metric": "accuracy"}
    with pytest.raises(UserInputError, match="early_stopping needs eval data"):
        train_domain(parse_recipe(data), "sentiment", tmp_path / "early")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template", [None, CHATML], ids=["no-template", "chatml"])
def test_chat_rows_train_on_the_assistant_turns_only(tiny_llama, template):
    from transformers import AutoTokenizer

    from peft_adapt.data import Example, tokenize_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"},
                {"role": "assistant", "content": "An ordered sequence."}, {"role": "user", "content": "And a set?"},
                {"role": "assistant", "content": "An unordered collection."}]
    (feature,) = tokenize_causal_lm([Example(1, messages=messages)], tokenizer, 512, packing=False)
    learned = tokenizer.decode([t for t, label in zip(feature["input_ids"], feature["labels"]) if label != -100])
    if template:
        assert learned == "An ordered sequence.<|im_end|>\nAn unordered collection.<|im_end|>\n"
    else:  # `assistant: text` lines: the reply starts after the colon, with its space
        assert learned == " An ordered sequence.\n An unordered collection.\n"
    whole = tokenizer.decode(feature["input_ids"])
    assert "What is a list?" in whole and "Be brief." in whole  # the prompt is there, just not learned


def test_chat_data_trains_a_causal_lm_adapter(tmp_path, tiny_llama):
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w} {w} {w}"}]}
            for w in ["red", "green", "blue", "cyan"] * 8]
    data = causal_recipe(tiny_llama, write_jsonl(tmp_path / "chat.jsonl", rows), max_steps=10)
    result = train_domain(parse_recipe(data), "docs", tmp_path)
    first, last = _loss_before_and_after(result)
    assert last < first
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UserInputError, match=r"bad.jsonl: row 1: no assistant message"):
        train_domain(parse_recipe(causal_recipe(tiny_llama, bad)), "docs", tmp_path / "bad")


def test_liger_kernels_are_used_only_where_they_apply(tiny_llama):
    from peft_adapt import UserInputError
    from peft_adapt.models.backbone import BaseSpec, load_backbone
    from peft_adapt.training.domain import _use_liger

    backbone = load_backbone(BaseSpec(model=str(tiny_llama), quantization="none"))
    assert _use_liger("auto", backbone) is False and _use_liger("none", backbone) is False  # the CPU: plain PyTorch
    with pytest.raises(UserInputError, match="training.kernels: liger cannot be used: .*(CUDA|not installed)"):
        _use_liger("liger", backbone)
