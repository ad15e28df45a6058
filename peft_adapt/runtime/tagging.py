"""Token classification served: inputs as rows of words, and the BIO tags of a row's words grouped into entities
(the words' token ids are `data.tokenize.encode_words`, their tags `models.crf.tag_rows`)."""

from __future__ import annotations

from ..errors import UserInputError


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
