"""A new user's first day: long texts, odd line breaks and files of their own through classify and the server."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import classification_recipe, write_jsonl

from peft_adapt import Registry
from peft_adapt.cli.main import main


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_bert, sentiment_file) -> Registry:
    from peft_adapt import parse_recipe, train_domain

    root = tmp_path_factory.mktemp("day-one")
    result = train_domain(parse_recipe(classification_recipe(tiny_bert, sentiment_file, max_steps=10)), "sentiment", root)
    registry = Registry(root / "reg")
    registry.add(result.out_dir, name="sentiment")
    return registry


def _long_review(tokens: int = 2000) -> str:
    words = ["good", "great", "the", "plot", "was", "awful", "acting", "fine", "and", "music"]
    return " ".join(words[i % len(words)] for i in range(tokens))


def test_a_2000_token_review_is_classified_as_training_cut_it(classifier, tiny_bert, capsys):
    from peft_adapt import AdapterRuntime

    review = _long_review()
    runtime = AdapterRuntime(str(tiny_bert), task="classification", quantization="none", registry=classifier)
    assert len(runtime.tokenizer(review)["input_ids"]) > runtime.max_positions  # longer than the encoder takes
    (result,) = runtime.classify([review], "sentiment")
    assert result["tokens"] == 32  # the recipe's max_length
    cut = runtime.tokenizer.decode(runtime.tokenizer(review, truncation=True, max_length=32)["input_ids"],
                                   skip_special_tokens=True)
    assert runtime.classify([cut], "sentiment")[0]["probs"] == pytest.approx(result["probs"], abs=1e-5)
    code = main(["classify", "--registry", str(classifier.root), "--quantization", "none", "--adapter", "sentiment",
                 "--json", review])
    assert code == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["label"] == result["label"]


def test_a_file_with_odd_line_breaks_gets_one_prediction_per_line_in_order(classifier, tmp_path, capsys):
    lines = ["good great\rlovely", "awful\u2028broken sad", "fine\x0cnice nice", "poor\x85bad", "\tgood\u2029great "]
    path = tmp_path / "reviews.txt"
    path.write_bytes(("\n".join(lines) + "\r\n").encode("utf-8"))
    out = tmp_path / "predictions.jsonl"
    code = main(["classify", "--registry", str(classifier.root), "--quantization", "none", "--adapter", "sentiment",
                 "--file", str(path), "--out", str(out), "--batch-size", "2"])
    assert code == 0
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["id"] for p in predictions] == [1, 2, 3, 4, 5]
    assert all(abs(sum(p["probs"].values()) - 1) < 1e-5 for p in predictions)
    capsys.readouterr()
    # each line alone gives what it got in the file
    for text, prediction in zip(lines, predictions):
        assert main(["classify", "--registry", str(classifier.root), "--quantization", "none", "--adapter", "sentiment",
                     "--json", text]) == 0
        alone = json.loads(capsys.readouterr().out)
        assert alone["probs"] == pytest.approx(prediction["probs"], abs=1e-5)


def test_data_files_are_read_by_text_field_with_their_ids(classifier, tmp_path, capsys):
    rows = [{"id": f"r{i}", "review": text} for i, text in enumerate(["good great", "awful sad", "nice fine"])]
    path = write_jsonl(tmp_path / "reviews.jsonl", rows)
    code = main(["classify", "--registry", str(classifier.root), "--quantization", "none", "--adapter", "sentiment",
                 "--file", str(path), "--text-field", "review", "--json"])
    assert code == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == ["r0", "r1", "r2"]
    assert main(["classify", "--registry", str(classifier.root), "--adapter", "sentiment", "--file", str(path)]) == 2
    assert "missing field 'text'" in capsys.readouterr().err


def test_the_server_classifies_a_2000_token_review(classifier, tiny_bert):
    from test_server import _auth, _start

    proc, url = _start(tiny_bert, classifier.root)
    try:
        response = httpx.post(f"{url}/v1/classify", headers=_auth(), timeout=60,
                              json={"model": "sentiment", "input": [_long_review(), "good"]})
        assert response.status_code == 200, response.text
        assert [d["index"] for d in response.json()["data"]] == [0, 1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
