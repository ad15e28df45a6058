"""How much CoNLL-2003 NER leans on capital letters, which the built-in encoder's uncased tokenizer never sees.

For every entity mention of the test set, its words are lowercased (what minilm-l6's tokenizer reads) and looked
up in the training set, also lowercased. A mention whose casing is its only cue is one where every word, so
read, is more often outside an entity than inside one in training (or never seen there), while the mention as
written is capitalised: `may` / `May`, `bush` / `Bush`, `major` / `Major`. Mentions with a word never seen in
training are counted apart: they have no lexical cue either way, only context (and, for a cased model, case).
Prints one JSON line: both shares (and per type), and the most frequent casing-only examples.

    python benchmarks/ner_casing.py
"""

from __future__ import annotations

import collections
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def mentions(tags: list[str]) -> list[tuple[int, int, str]]:
    """(start, end, type) of each BIO entity span."""
    spans, start, kind = [], None, None
    for i, tag in enumerate(tags + ["O"]):
        if start is not None and not (tag.startswith("I-") and tag[2:] == kind):
            spans.append((start, i, kind))
            start = None
        if tag.startswith("B-") or (tag.startswith("I-") and start is None):
            start, kind = i, tag[2:]
    return spans


def main() -> None:
    from peft_adapt.training.recipe import data_root

    root = data_root() / "conll2003"
    read = lambda name: [json.loads(line) for line in open(root / name, encoding="utf-8")]  # noqa: E731
    inside, outside = collections.Counter(), collections.Counter()
    for row in read("train.jsonl"):
        for word, tag in zip(row["tokens"], row["tags"]):
            (outside if tag == "O" else inside)[word.lower()] += 1
    total, casing_only, unseen = collections.Counter(), collections.Counter(), collections.Counter()
    examples = collections.Counter()
    for row in read("test.jsonl"):
        for start, end, kind in mentions(row["tags"]):
            words = row["tokens"][start:end]
            total[kind] += 1
            capitalised = any(w[:1].isupper() for w in words)
            lexical = any(inside[w.lower()] > outside[w.lower()] for w in words)
            if not capitalised or lexical:
                continue
            if all(outside[w.lower()] > 0 for w in words):  # every word a known non-entity word, lowercased
                casing_only[kind] += 1
                examples[" ".join(words)] += 1
            else:  # some word never seen in training: no lexical cue either way, only context (and case)
                unseen[kind] += 1
    print(json.dumps({
        "benchmark": "ner_casing", "test_mentions": sum(total.values()),
        "casing_only_share": sum(casing_only.values()) / sum(total.values()),
        "casing_only_share_by_type": {k: casing_only[k] / total[k] for k in sorted(total)},
        "unseen_capitalised_share": sum(unseen.values()) / sum(total.values()),
        "most_common": examples.most_common(15),
    }), flush=True)


if __name__ == "__main__":
    main()
