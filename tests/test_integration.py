"""The built-in real models on real text, on the CPU: the quickstart's claim and a classifier on Amazon reviews."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def test_quickstart_adapters_beat_the_base_on_their_own_domain(tmp_path, monkeypatch):
    from peft_adapt.cli.quickstart import run_quickstart

    monkeypatch.chdir(tmp_path.parent)  # a relative output folder, as `peft-adapt quickstart` gets by default
    report = run_quickstart(out=tmp_path.name, domains=("code", "news"), steps=8, batch_size=4, max_length=128,
                            eval_blocks=3)
    for domain, change in report["own_domain_change"].items():
        assert change < -0.05, (domain, report["perplexity"])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["perplexity"] == report["perplexity"]
    assert (tmp_path / "perplexity_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "adapters" / "code" / "adapter_model.safetensors").is_file()


def test_minilm_lora_on_nf4_learns_amazon_sentiment(tmp_path, shared_data):
    from conftest import PROJECT

    from peft_adapt import load_recipe, train_domain

    recipe = load_recipe(PROJECT / "recipes" / "amazon_sentiment.yaml", [
        "training.max_train_rows=320", "training.max_eval_rows=100", "training.epochs=1", "training.eval_steps=null",
        "training.early_stopping=null", "training.learning_rate=1e-3", "task.max_length=64",
    ])
    result = train_domain(recipe, "kitchen", tmp_path)
    assert result.manifest.pooling == "mean"  # the sentence-transformer's own pooling
    assert result.metrics["test"]["accuracy"] > 0.65, result.metrics["test"]


@pytest.mark.gpu
def test_qlora_training_on_cuda_in_bf16(tmp_path, tiny_llama, docs_file):
    from conftest import causal_recipe

    from peft_adapt import parse_recipe, train_domain

    recipe = parse_recipe(causal_recipe(tiny_llama, docs_file, "nf4", max_steps=20) | {})
    result = train_domain(recipe, "docs", tmp_path)
    assert result.backbone.device.type == "cuda"
    assert torch.isfinite(torch.tensor(result.metrics["eval"]["loss"]))
    assert result.metrics["peak_gpu_memory_bytes"] > 0
