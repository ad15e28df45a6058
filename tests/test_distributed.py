"""Training in 2 processes on the CPU (gloo): data parallel, one domain per worker, and a failing worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import causal_recipe, write_jsonl

from peft_adapt.registry import Registry


def _train(tmp_path: Path, recipe: dict, *flags: str) -> subprocess.CompletedProcess:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "peft_adapt.cli", "train", str(path), "--num-processes", "2",
               "--registry", str(tmp_path / "reg"), "--out", str(tmp_path / "out"), *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_data_parallel_training_lowers_the_loss_and_registers_one_adapter(tmp_path, tiny_llama, docs_file):
    recipe = causal_recipe(tiny_llama, docs_file, "nf4", max_steps=12, logging_steps=1)
    done = _train(tmp_path, recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    entries = Registry(tmp_path / "reg").list()
    assert [(e.name, e.version) for e in entries] == [("t-docs", 1)]
    history = json.loads((tmp_path / "out" / "docs" / "log_history.json").read_text())
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses[-1] < losses[0], losses
    # both processes trained the one adapter: each saw half of every global batch
    assert sum("registered as t-docs@1" in line for line in done.stdout.splitlines()) == 1


def test_parallel_domains_registers_each_domain_once(tmp_path, tiny_llama, docs_file):
    recipe = causal_recipe(tiny_llama, docs_file, "none", max_steps=4)
    recipe["domains"]["code"] = {"train": str(docs_file)}
    done = _train(tmp_path, recipe, "--parallel-domains")
    assert done.returncode == 0, done.stderr[-3000:]
    entries = Registry(tmp_path / "reg").list()
    assert sorted((e.name, e.version) for e in entries) == [("t-code", 1), ("t-docs", 1)]


def test_a_failing_worker_reports_its_domain_and_leaves_no_half_written_adapter(tmp_path, tiny_llama, docs_file):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"body": "no text here"}])
    recipe = causal_recipe(tiny_llama, docs_file, "none", max_steps=4)
    recipe["domains"]["broken"] = {"train": str(bad)}
    done = _train(tmp_path, recipe, "--parallel-domains")
    assert done.returncode != 0
    assert "domain 'broken' failed on worker" in done.stderr and "bad.jsonl: row 2: missing field 'text'" in done.stderr
    registry = Registry(tmp_path / "reg")
    assert [e.name for e in registry.list()] == ["t-docs"]  # the healthy worker finished its domain
    assert registry.verify().ok
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".failures")) == ["docs"]
