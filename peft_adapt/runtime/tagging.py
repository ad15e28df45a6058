"""Token classification served: words to token ids (each word's first sub-token marked, as training marked it),
a tag per word from the adapter's head (decoded by Viterbi through its CRF where it has one), and BIO tags grouped
into entities."""

from __future__ import annotations

import torch

from ..errors import UserInputError
from ..models.crf import CRF, words_of


def words_of_inputs(inputs) -> list[list[str]]:
    """Each input as its words: a text is split on whitespace, a list of words is taken as it is."""
    if isinstance(inputs, str):
        raise UserInputError("pass a list of inputs (one per row: a text, or a list of words), not a single string")
    rows = []
    for i, item in enumerate(inputs):
        words = item.split() if isinstance(item, str) else item
        if not isinstance(words, (list, tuple)) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise UserInputError(f"input {i}: give a text with at least one word, or a list of non-empty words")
        rows.append(list(words))
    return rows


def encode_words(tokenizer, rows: list[list[str]], limits: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, starts) padded on the right: `starts` is True at each word's first sub-token. A row is cut to its
    limit as training cut it; the words past the cut have no start, so they get no tag."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserInputError("tagging needs a fast tokenizer (its word ids map tokens to words); this base's is slow")
    encoded = []
    for words, limit in zip(rows, limits):
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=limit)
        previous, starts = None, []
        for word in enc.word_ids():
            starts.append(word is not None and word != previous)
            previous = word
        encoded.append((enc["input_ids"], starts))
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([row + [pad] * (width - len(row)) for row, _ in encoded])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row, _ in encoded])
    starts = torch.tensor([s + [False] * (width - len(s)) for _, s in encoded])
    return ids, mask, starts


def tag_rows(hidden: torch.Tensor, starts: torch.Tensor, head: dict, labels: list[str]) -> list[list[str]]:
    """The tags of each row's words (those that survived the cut) from one adapter's head: the CRF's best sequence
    where the head has one, else each word's most likely tag."""
    weight, bias = head["weight"].float().to(hidden.device), head["bias"].float().to(hidden.device)
    emissions, mask = words_of(hidden.float() @ weight.T + bias, starts)
    counts = mask.sum(1).tolist()
    if "crf.transitions" in head:
        crf = CRF(labels).to(hidden.device)
        with torch.no_grad():
            for part in ("start", "end", "transitions"):
                getattr(crf, part).copy_(head[f"crf.{part}"].float())
        real = [i for i, n in enumerate(counts) if n]  # Viterbi needs a word; a row cut to nothing has no tags
        paths = dict(zip(real, crf.decode(emissions[real], mask[real]))) if real else {}
        ids = [paths.get(i, []) for i in range(len(counts))]
    else:
        best = emissions.argmax(-1).tolist()
        ids = [row[:n] for row, n in zip(best, counts)]
    return [[labels[t] for t in row] for row in ids]


def entities(words: list[str], tags: list[str]) -> list[dict]:
    """BIO tags (BIOES and plain IO too) as entity spans: {type, start, end (exclusive word indexes), text}. A word
    continues the open entity when its tag is `I-X`/`E-X` (or a bare `X`) after one of type X; otherwise it opens one,
    as conlleval reads an `I-X` after `O`."""
    spans: list[dict] = []
    open_type = None
    for i, tag in enumerate(tags):
        if tag == "O":
            open_type = None
            continue
        kind, sep, label = tag.partition("-")
        if not sep:  # IO: consecutive words of one bare tag are one entity
            kind, label = "I", tag
        if kind in ("I", "E") and open_type == label:
            spans[-1]["end"] = i + 1
        else:
            spans.append({"type": label, "start": i, "end": i + 1})
            open_type = label
        if kind in ("E", "S"):
            open_type = None
    for span in spans:
        span["text"] = " ".join(words[span["start"] : span["end"]])
    return spans
