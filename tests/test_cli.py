"""The CLI: a recipe trains and evaluates end to end; each bad input exits non-zero with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import causal_recipe, classification_recipe, write_jsonl

from peft_adapt.cli.main import main


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _recipe_file(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _split_file(source: Path, tmp_path: Path, n_eval: int) -> tuple[Path, Path]:
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    return write_jsonl(tmp_path / "train.jsonl", rows[n_eval:]), write_jsonl(tmp_path / "eval.jsonl", rows[:n_eval])


def test_train_then_eval_a_classifier_from_the_command_line(tmp_path, tiny_bert, sentiment_file, capsys):
    train, held = _split_file(sentiment_file, tmp_path, 24)
    data = classification_recipe(tiny_bert, train, "nf4", max_steps=20)
    data["domains"]["sentiment"]["eval"] = str(held)
    code, out, _ = _run(capsys, "train", _recipe_file(tmp_path, data), "--out", tmp_path / "runs")
    assert code == 0 and "sentiment: eval" in out
    adapter = tmp_path / "runs" / "sentiment"
    measured = json.loads((adapter / "metrics.json").read_text())["eval"]
    code, out, _ = _run(capsys, "eval", adapter, held)
    assert code == 0
    again = json.loads(out)
    # a fresh nf4 load computes at bf16 precision on AVX512-BF16 CPUs: allow one of 24 predictions to flip
    assert again["examples"] == 24 and abs(again["accuracy"] - measured["accuracy"]) <= 1 / 24


def test_eval_of_a_causal_lm_adapter_reproduces_the_training_measurement(tmp_path, tiny_llama, docs_file, capsys):
    train, held = _split_file(docs_file, tmp_path, 8)
    data = causal_recipe(tiny_llama, train, "none", max_steps=5)
    data["domains"]["docs"]["eval"] = str(held)
    assert _run(capsys, "train", _recipe_file(tmp_path, data), "--out", tmp_path / "runs")[0] == 0
    adapter = tmp_path / "runs" / "docs"
    measured = json.loads((adapter / "metrics.json").read_text())["eval"]
    code, out, _ = _run(capsys, "eval", adapter, held)
    assert code == 0
    again = json.loads(out)
    assert again["tokens"] == measured["tokens"]
    assert again["perplexity"] == pytest.approx(measured["perplexity"], rel=1e-5)


@pytest.mark.parametrize("case, message", [
    ("unknown_key", r"training.learning_rte: unknown key"),
    ("wrong_type", r"training.max_steps: Input should be a valid integer"),
    ("missing_file", r"absent.jsonl does not exist"),
    ("row_without_text", r"no_text.jsonl: row 2: missing field 'text'"),
    ("empty_dataset", r"empty.jsonl: the dataset is empty"),
    ("label_outside_map", r"eval.jsonl: row 1: label 'maybe' is outside the label map"),
    ("model_nowhere", r"model 'not-a-model' resolves nowhere"),
    ("unknown_quantization", r"base.quantization: Input should be 'none', 'int8', 'nf4' or 'fp4'"),
])
def test_bad_input_exits_2_with_a_message_naming_it(tmp_path, tiny_bert, sentiment_file, capsys, case, message):
    data = classification_recipe(tiny_bert, sentiment_file, max_steps=2)
    domain = data["domains"]["sentiment"]
    if case == "unknown_key":
        data["training"]["learning_rte"] = 0.1
    elif case == "wrong_type":
        data["training"]["max_steps"] = "ten"
    elif case == "missing_file":
        domain["train"] = str(tmp_path / "absent.jsonl")
    elif case == "row_without_text":
        domain["train"] = str(write_jsonl(tmp_path / "no_text.jsonl", [{"text": "a", "label": 0}, {"body": "b", "label": 1}]))
    elif case == "empty_dataset":
        (tmp_path / "empty.jsonl").write_text("")
        domain["train"] = str(tmp_path / "empty.jsonl")
    elif case == "label_outside_map":
        domain["eval"] = str(write_jsonl(tmp_path / "eval.jsonl", [{"text": "a", "label_name": "maybe"}]))
    elif case == "model_nowhere":
        data["base"]["model"] = "not-a-model"
    elif case == "unknown_quantization":
        data["base"]["quantization"] = "int3"
    code, _, err = _run(capsys, "train", _recipe_file(tmp_path, data), "--out", tmp_path / "runs")
    assert code == 2
    assert err.startswith("error: ")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "runs" / "sentiment" / "manifest.json").exists()


def test_missing_recipe_file_exits_2(tmp_path, capsys):
    code, _, err = _run(capsys, "train", tmp_path / "nope.yaml")
    assert code == 2 and "nope.yaml does not exist" in err


def test_eval_takes_registry_refs_scores_the_base_alone_and_writes_each_example(tmp_path, tiny_llama, docs_file, capsys,
                                                                                monkeypatch):
    train, held = _split_file(docs_file, tmp_path, 8)
    data = causal_recipe(tiny_llama, train, "none", max_steps=5)
    data["domains"]["docs"]["eval"] = str(held)
    registry = tmp_path / "reg"
    assert _run(capsys, "train", _recipe_file(tmp_path, data), "--out", tmp_path / "runs", "--registry", registry)[0] == 0
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t-docs").mkdir()  # a folder named like the adapter never shadows the registered one
    code, out, _ = _run(capsys, "eval", "t-docs", held, "--registry", registry, "--out", tmp_path / "per-row.jsonl")
    assert code == 0
    adapter = json.loads(out)
    assert adapter["adapter"] == "t-docs@1"
    rows = [json.loads(line) for line in (tmp_path / "per-row.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(1, 9)) and sum(r["tokens"] for r in rows) == adapter["tokens"]
    code, out, _ = _run(capsys, "eval", "t-docs", held, "--registry", registry, "--base-only")
    base = json.loads(out)
    assert code == 0 and base["base_of"] == "t-docs@1" and base["tokens"] == adapter["tokens"]
    assert base["perplexity"] > adapter["perplexity"]  # five steps on this domain already help
    code, out, _ = _run(capsys, "eval", tiny_llama, held, "--base-only", "--quantization", "none", "--max-length", "64")
    assert code == 0 and json.loads(out)["perplexity"] == pytest.approx(base["perplexity"], rel=1e-6)


def test_eval_writes_each_classification_with_its_gold_label(tmp_path, tiny_bert, sentiment_file, capsys):
    train, held = _split_file(sentiment_file, tmp_path, 12)
    data = classification_recipe(tiny_bert, train, max_steps=5)
    assert _run(capsys, "train", _recipe_file(tmp_path, data), "--out", tmp_path / "runs", "--no-register")[0] == 0
    code, out, _ = _run(capsys, "eval", tmp_path / "runs" / "sentiment", held, "--out", tmp_path / "p.jsonl")
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {r["gold"] for r in rows} <= {"negative", "positive"}
    accuracy = sum(r["label"] == r["gold"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(json.loads(out)["accuracy"])
    code, _, err = _run(capsys, "eval", tmp_path / "runs" / "sentiment", held, "--base-only")
    assert code == 2 and "--base-only measures causal LM and seq2seq bases" in err


def test_the_command_starts_without_torch_and_names_every_merge_method():
    """The parser loads no model library (a verb imports what it runs), and `merge --method`'s help names exactly
    the merge table's methods."""
    import subprocess
    import sys

    code = ("import sys; from peft_adapt.cli.main import build_parser; p = build_parser(); "
            "print('torch' in sys.modules or 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    from peft_adapt.cli.main import build_parser
    from peft_adapt.merge import METHODS

    merge = build_parser()._subparsers._group_actions[0].choices["merge"]
    help_text = next(a.help for a in merge._actions if "--method" in a.option_strings)
    assert set(METHODS) == {w.strip(" ,(") for w in help_text.split("(")[0].replace(" or ", ", ").split(",")}
