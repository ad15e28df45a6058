"""The CRF output layer of token classification: exact against brute force, BIO never violated, trained on a
quantized base, saved with the adapter and scored again from its folder."""

from __future__ import annotations

import itertools

import torch
from conftest import write_jsonl
from safetensors.torch import load_file

from peft_adapt import parse_recipe, train_domain
from peft_adapt.models.crf import CRF, FORBIDDEN
from peft_adapt.training.evaluation import evaluate_file

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _valid(path: list[str]) -> bool:
    before = "O"
    for tag in path:
        if tag.startswith("I-") and (before == "O" or before[2:] != tag[2:]):
            return False
        before = tag
    return True


def _random_crf(seed: int) -> CRF:
    torch.manual_seed(seed)
    crf = CRF(TAGS)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_(0, 2.0)
    return crf


def test_likelihood_and_viterbi_equal_brute_force_over_every_sequence():
    crf = _random_crf(0)
    emissions = torch.randn(2, 4, len(TAGS))
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    start, moves, end = crf._scores()
    for row in range(2):
        n = int(mask[row].sum())
        scores = {}
        for path in itertools.product(range(len(TAGS)), repeat=n):
            s = start[path[0]] + emissions[row, 0, path[0]] + end[path[-1]]
            s = s + sum(moves[a, b] + emissions[row, w + 1, b] for w, (a, b) in enumerate(zip(path, path[1:])))
            scores[path] = s
        log_z = torch.logsumexp(torch.stack(list(scores.values())), 0)
        gold = max(scores, key=lambda p: float(scores[p]) if _valid([TAGS[t] for t in p]) else -1e9)
        tags = torch.zeros(2, 4, dtype=torch.long)
        tags[row, :n] = torch.tensor(gold)
        nll = crf.neg_log_likelihood(emissions, tags, mask)[row]
        assert torch.isclose(nll, log_z - scores[gold], atol=1e-4)
        assert tuple(crf.decode(emissions, mask)[row]) == max(scores, key=lambda p: float(scores[p]))


def test_decoded_sequences_never_violate_bio():
    for seed in range(20):
        crf = _random_crf(seed)
        emissions = torch.randn(8, 12, len(TAGS)) * 5
        emissions[..., 2] += 10  # emissions that would pick I-PER everywhere, from the first word on
        for path in crf.decode(emissions, torch.ones(8, 12, dtype=torch.bool)):
            assert _valid([TAGS[t] for t in path])
    assert FORBIDDEN < -1000


def test_a_crf_head_trains_on_a_quantized_base_and_is_scored_again_from_its_folder(tmp_path, tiny_bert):
    rows = []
    for i in range(64):
        first, last = ["Alice", "Bob", "Carol", "Dave"][i % 4], ["Smith", "Jones"][i % 2]
        place = ["Paris", "Rome", "Oslo", "Lima"][i // 4 % 4]
        rows.append({"tokens": [first, last, "lives", "in", place, "."],
                     "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "O"]})
    train = write_jsonl(tmp_path / "ner.jsonl", rows)
    data = {
        "base": {"model": str(tiny_bert), "quantization": "nf4"},
        "task": {"type": "token_classification", "max_length": 32, "crf": True},
        "adapter": {"r": 8, "alpha": 16},
        "training": {"max_steps": 40, "batch_size": 16, "learning_rate": 1e-2, "seed": 0},
        "domains": {"ner": {"train": str(train), "test": str(train)}},
    }
    result = train_domain(parse_recipe(data), "ner", tmp_path / "crf")
    history = [e["loss"] for e in __import__("json").loads((result.out_dir / "log_history.json").read_text())
               if "loss" in e]
    assert history[-1] < history[0]
    assert result.metrics["test"]["f1"] > 0.8, result.metrics["test"]
    saved = load_file(str(result.out_dir / "adapter_model.safetensors"))
    transitions = [k for k in saved if "crf" in k and "transitions" in k]
    assert transitions and saved[transitions[0]].abs().max() > 0  # the transitions trained and travel with it
    again = evaluate_file(result.out_dir, train)
    assert again["f1"] == result.metrics["test"]["f1"]
