"""Training in 2 processes on the CPU (gloo): data parallel, one domain per worker, and a failing worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import causal_recipe, write_jsonl

from peft_adapt import Registry


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
    # each worker reports in whole lines of its own, not interleaved progress bars
    lines = done.stdout.splitlines()
    for worker, domain in ((0, "code"), (1, "docs")):  # the recipe's domains, dealt out in order
        assert any(line.startswith(f"[worker {worker} {domain}] step 4/4") for line in lines), done.stdout
        assert any(line.startswith(f"[worker {worker}] {domain}: eval") for line in lines), done.stdout
    assert "it/s]" not in done.stderr and not any(line.startswith("{'") for line in lines)


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


def _first_loss_rows(task: str) -> list[dict]:
    if task == "classification":
        return [{"text": f"{w} {w} item {i}", "label": i % 2} for i, w in enumerate(["good", "bad"] * 4)]
    return [{"tokens": [n, "lives", "in", p, "."], "tags": ["B-PER", "O", "O", "B-LOC", "O"]}
            for n, p in zip(["Alice", "Bob", "Carol", "Dave"] * 2, ["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Bern", "Riga", "Oslo"])]


def test_one_and_two_processes_log_the_same_first_loss_for_every_head(tmp_path, tiny_bert):
    """Trainer scales the loss of models that accept loss kwargs by the number of processes: a head that
    ignored `num_items_in_batch` logged (and trained on) twice the loss under two processes. (A causal LM's loss is
    transformers' own, which reads it; the heads here are ours. Two-process causal training is in the tests above.)"""
    first = {}
    for task in ("classification", "token_classification"):
        data = write_jsonl(tmp_path / f"{task}.jsonl", _first_loss_rows(task))
        base = tiny_bert
        for processes, batch in ((1, 8), (2, 4)):  # the same 8 rows in the first step either way
            recipe = {
                "base": {"model": str(base), "quantization": "nf4"},
                "task": {"type": task, "max_length": 48},
                "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                "training": {"max_steps": 1, "batch_size": batch, "learning_rate": 1e-9, "seed": 0, "logging_steps": 1},
                "domains": {"d": {"train": str(data), "eval": str(data)}},
            }
            out = tmp_path / f"{task}-{processes}"
            if processes == 1:  # in this process: the launcher is what the two-process run adds
                from peft_adapt.training.domain import train_domain
                from peft_adapt.training.recipe import parse_recipe

                train_domain(parse_recipe(recipe), "d", out)
            else:
                path = tmp_path / f"{task}-{processes}.yaml"
                path.write_text(yaml.safe_dump(recipe))
                command = [sys.executable, "-m", "peft_adapt.cli", "train", str(path), "--num-processes", "2",
                           "--no-register", "--out", str(out)]
                done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                                      env=os.environ | {"OMP_NUM_THREADS": "1"})
                assert done.returncode == 0, done.stderr[-3000:]
            history = json.loads((out / "d" / "log_history.json").read_text())
            first[task, processes] = next(e["loss"] for e in history if "loss" in e)
    for task in ("classification", "token_classification"):
        one, two = first[task, 1], first[task, 2]
        # the classification head's own dropout draws differently in two processes: a few percent, never 2x
        assert abs(two - one) / one < 0.05, (task, one, two)
