"""Token classification served: the runtime, `peft-adapt tag` and `POST /v1/tag` tag words as evaluation does (CRF
adapters by Viterbi), with a different adapter per row of one batch."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from conftest import write_jsonl
from test_server import _auth, _error, _start

from peft_adapt import AdapterRuntime, Registry, parse_recipe, train_domain
from peft_adapt.cli.main import main
from peft_adapt.models.crf import tag_rows
from peft_adapt.runtime.tagging import entities
from peft_adapt.training.evaluation import evaluate_file

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
FIRST, LAST = ["Alice", "Bob", "Carol", "Dave", "Erin"], ["Smith", "Jones", "Brown"]
PLACES = ["Paris", "Rome", "Oslo", "Lima", "New York"]


def _rows(count: int, seed: int) -> list[dict]:
    rng = __import__("random").Random(seed)
    rows = []
    for _ in range(count):
        person = [rng.choice(FIRST)] + ([rng.choice(LAST)] if rng.random() < 0.6 else [])
        place = rng.choice(PLACES).split()
        words = person + ["moved", "to"] + place + ["last", "year", "."] * rng.randint(0, 3)
        tags = ["B-PER"] + ["I-PER"] * (len(person) - 1) + ["O", "O", "B-LOC"] + ["I-LOC"] * (len(place) - 1)
        rows.append({"tokens": words, "tags": tags + ["O"] * (len(words) - len(tags))})
    return rows


@pytest.fixture(scope="module")
def taggers(tmp_path_factory, tiny_bert):
    """Two briefly trained NER adapters on the nf4 base (a CRF and a softmax head), registered; the rows are cut at
    16 tokens, so the longest rows lose words."""
    root = tmp_path_factory.mktemp("tagging")
    train = write_jsonl(root / "train.jsonl", _rows(64, 0))
    test = write_jsonl(root / "test.jsonl", _rows(12, 1))
    registry = Registry(root / "reg")
    for name, crf in (("ner-crf", True), ("ner-soft", False)):
        data = {"base": {"model": str(tiny_bert), "quantization": "nf4"},
                "task": {"type": "token_classification", "max_length": 16, "crf": crf},
                "adapter": {"r": 8, "alpha": 16},
                "training": {"max_steps": 8, "batch_size": 16, "learning_rate": 1e-2, "seed": 0},
                "domains": {name: {"train": str(train)}}}
        registry.add(train_domain(parse_recipe(data), name, root).out_dir, name=name)
    return registry, test


def _words(test) -> list[list[str]]:
    return [json.loads(line)["tokens"] for line in test.read_text().splitlines()]


def test_tags_of_a_mixed_batch_equal_each_row_alone_and_what_evaluation_predicts(taggers, tiny_bert):
    registry, test = taggers
    runtime = AdapterRuntime(str(tiny_bert), task="classification", quantization="nf4", registry=registry)
    rows = _words(test)
    names = ["ner-crf" if i % 2 else "ner-soft" for i in range(len(rows))]
    mixed = runtime.tag(rows, names)
    assert any(r["untagged"] for r in mixed)  # the cut at max_length is exercised
    for words, name, result in zip(rows, names, mixed):
        alone = runtime.tag([words], name)[0]
        assert result["tags"] == alone["tags"] and result["adapter"] == name
        assert len(result["tags"]) + result["untagged"] == len(words)
    for name in ("ner-crf", "ner-soft"):
        records: list = []
        evaluate_file(registry.locate(name)[0], test, records=records)
        served = [r for r, n in zip(mixed, names) if n == name]
        expected = [rec["tags"] for rec, n in zip(records, names) if n == name]
        for result, tags in zip(served, expected):  # evaluation counts cut words as O
            assert result["tags"] + ["O"] * result["untagged"] == tags
    with pytest.raises(Exception, match="token_classification adapter; serve it with tag"):
        runtime.classify(["Alice moved to Rome"], "ner-crf")
    with pytest.raises(Exception, match="input 0: give a text with at least one word"):
        runtime.tag(["   "], "ner-crf")


def test_a_crf_head_decodes_a_valid_sequence_where_the_softmax_head_does_not():
    torch.manual_seed(0)
    hidden = torch.randn(1, 3, 4)
    starts = torch.tensor([[True, True, True]])
    weight = torch.zeros(len(TAGS), 4)
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0])  # every word most likely I-PER, the first included
    softmax = tag_rows(hidden, starts, {"weight": weight, "bias": bias}, TAGS)
    crf_head = {"weight": weight, "bias": bias, "crf.start": torch.zeros(5), "crf.end": torch.zeros(5),
                "crf.transitions": torch.zeros(5, 5)}
    crf = tag_rows(hidden, starts, crf_head, TAGS)
    assert softmax == [["I-PER", "I-PER", "I-PER"]]
    assert crf == [["B-PER", "I-PER", "I-PER"]]  # BIO: an entity opens with B


def test_entities_group_bio_bioes_and_io_tags():
    words = ["Ann", "Lee", "met", "Bo", "in", "New", "York"]
    assert entities(words, ["B-PER", "I-PER", "O", "B-PER", "O", "B-LOC", "I-LOC"]) == [
        {"type": "PER", "start": 0, "end": 2, "text": "Ann Lee"}, {"type": "PER", "start": 3, "end": 4, "text": "Bo"},
        {"type": "LOC", "start": 5, "end": 7, "text": "New York"}]
    assert [e["text"] for e in entities(words, ["I-PER", "I-PER", "O", "S-PER", "O", "B-LOC", "E-LOC"])] == [
        "Ann Lee", "Bo", "New York"]
    assert [e["type"] for e in entities(words, ["PER", "PER", "O", "PER", "O", "LOC", "LOC"])] == ["PER", "PER", "LOC"]
    assert [e["text"] for e in entities(words, ["B-PER", "B-PER", "O", "O", "O", "O", "O"])] == ["Ann", "Lee"]


def test_tag_on_the_command_line_and_through_the_server(taggers, tiny_bert, tmp_path, capsys):
    registry, test = taggers
    out = tmp_path / "tags.jsonl"
    assert main(["tag", "--file", str(test), "--text-field", "tokens", "--adapter", "ner-crf", "--registry",
                 str(registry.root), "--out", str(out)]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    runtime = AdapterRuntime(str(tiny_bert), task="classification", quantization="nf4", registry=registry)
    rows = _words(test)
    assert [r["tags"] for r in written] == [r["tags"] for r in runtime.tag(rows, "ner-crf")]
    proc, url = _start(tiny_bert, registry.root, "--quantization", "nf4")
    try:
        texts = [" ".join(words) for words in rows[:4]]
        body = httpx.post(f"{url}/v1/tag", headers=_auth(), timeout=60,
                          json={"model": "ner-soft", "input": texts}).json()
        expected = runtime.tag(texts, "ner-soft")
        assert [d["tags"] for d in body["data"]] == [e["tags"] for e in expected]
        assert [d["entities"] for d in body["data"]] == [e["entities"] for e in expected]
        words = httpx.post(f"{url}/v1/tag", headers=_auth(), timeout=60, json={"model": "ner-crf", "input": rows[:2]})
        assert [d["tags"] for d in words.json()["data"]] == [r["tags"] for r in written[:2]]
        _error(httpx.post(f"{url}/v1/classify", headers=_auth(), json={"model": "ner-crf", "input": "Bob"}), 400,
               "serve it with tag")
        _error(httpx.post(f"{url}/v1/tag", headers=_auth(), json={"model": "ner-crf", "input": " "}), 400,
               "at least one word")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_crf_tagger_exports_to_an_automodel_folder_that_its_cards_snippet_runs(taggers, tiny_bert, tmp_path):
    from test_merge import _snippet

    from peft_adapt import export_model

    registry, test = taggers
    report = export_model(registry, "ner-crf", tmp_path / "out", dtype="fp32", probe=test, fidelity="logits")
    assert report["rows"] == 12 and report["word_tag_agreement"] >= 0.95, report  # nf4 served, fp32 exported
    rows = _words(test)
    exported = [_snippet(tmp_path / "out")["tag"](words) for words in rows]
    served = AdapterRuntime(str(tiny_bert), task="classification", quantization="nf4", registry=registry)
    found = [w for words in exported for w in words]
    expected = [t for r in served.tag(rows, "ner-crf") for t in r["tags"]]
    assert len(found) == len(expected)
    assert sum(a == b for a, b in zip(found, expected)) / len(found) == report["word_tag_agreement"]
    assert json.loads((tmp_path / "out" / "head.json").read_text())["crf"] is True
