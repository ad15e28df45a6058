"""Shared fixtures: tiny random models built from a config (no download) and small real-text data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the hub in tests

PROJECT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def shared_data_dir() -> Path | None:
    from peft_adapt.training.recipe import data_root

    root = data_root()
    return root if root.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_dir()
    if root is None:
        pytest.skip("the shared evaluation data (../shared/data or $PEFT_ADAPT_DATA) is absent")
    return root


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from peft_adapt.testing.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from peft_adapt.testing.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-bert", "bert")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def docs_file(tmp_path_factory) -> Path:
    """Real text: Python documentation topics, cut short."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    rows = [{"text": topics[k][:400]} for k in sorted(topics)[:48]]
    return write_jsonl(tmp_path_factory.mktemp("data") / "docs.jsonl", rows)


@pytest.fixture(scope="session")
def sentiment_file(tmp_path_factory) -> Path:
    """A small two-class file whose classes are told apart by their words."""
    import random

    rng = random.Random(0)
    rows = []
    for i in range(96):
        label = i % 2
        words = ["good", "great", "lovely", "fine", "nice"] if label else ["bad", "awful", "poor", "broken", "sad"]
        text = " ".join(rng.choice(words) for _ in range(8))
        rows.append({"text": text, "label": label, "label_name": ["negative", "positive"][label]})
    return write_jsonl(tmp_path_factory.mktemp("data") / "sentiment.jsonl", rows)


def causal_recipe(model: Path, train: Path, quantization: str = "none", **training) -> dict:
    return {
        "name": "t",
        "base": {"model": str(model), "quantization": quantization},
        "task": {"type": "causal_lm", "max_length": 64},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"max_steps": 30, "batch_size": 8, "learning_rate": 1e-2, "seed": 0} | training,
        "domains": {"docs": {"train": str(train)}},
    }


def classification_recipe(model: Path, train: Path, quantization: str = "none", **training) -> dict:
    return {
        "name": "t",
        "base": {"model": str(model), "quantization": quantization},
        "task": {"type": "classification", "max_length": 32},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"max_steps": 30, "batch_size": 16, "learning_rate": 1e-2, "seed": 0} | training,
        "domains": {"sentiment": {"train": str(train)}},
    }


@pytest.fixture(autouse=True)
def _isolated_registry(tmp_path, monkeypatch):
    """No test writes to the user's ~/.peft_adapt."""
    monkeypatch.setenv("PEFT_ADAPT_HOME", str(tmp_path / "default-registry"))


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory, tiny_llama, docs_file) -> Path:
    """A LoRA adapter folder trained for a few steps on the tiny Llama (unquantized), as `peft-adapt train` writes it."""
    from peft_adapt import parse_recipe, train_domain

    out = tmp_path_factory.mktemp("trained")
    result = train_domain(parse_recipe(causal_recipe(tiny_llama, docs_file, "none", max_steps=3)), "docs", out)
    return result.out_dir


@pytest.fixture(scope="session")
def team_servers(tmp_path_factory):
    """A real PostgreSQL server and a real S3-compatible server (moto), started once for the session."""
    from peft_adapt.testing.local_servers import local_team_servers

    with local_team_servers(tmp_path_factory.mktemp("servers")) as servers:
        yield servers


@pytest.fixture
def team(request, tmp_path, monkeypatch):
    """An empty shared registry: a fresh PostgreSQL database and a fresh prefix in the S3 bucket."""
    import uuid

    from team_servers import Backend

    from peft_adapt.testing.local_servers import BUCKET, new_database

    postgres, env = request.getfixturevalue("team_servers")
    monkeypatch.setenv("PEFT_ADAPT_CACHE", str(tmp_path / "cache"))  # the CLI's cache, as the other tests open it
    return Backend("shared", new_database(postgres), f"s3://{BUCKET}/{uuid.uuid4().hex}", str(tmp_path / "cache"), env)


@pytest.fixture(params=["embedded", "shared"])
def backend(request, tmp_path):
    """The registry under test: embedded (SQLite + folders) or shared (PostgreSQL + S3), empty."""
    from team_servers import Backend

    if request.param == "embedded":
        return Backend("embedded", str(tmp_path / "reg"))
    return request.getfixturevalue("team")
