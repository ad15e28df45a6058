"""Evaluation metrics: accuracy and macro-F1 for classification, perplexity for causal LM."""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    if len(predictions) != len(labels) or not labels:
        raise ValueError("accuracy needs equally long, non-empty predictions and labels")
    return sum(int(p == y) for p, y in zip(predictions, labels)) / len(labels)


def macro_f1(predictions: Sequence[int], labels: Sequence[int], num_labels: int | None = None) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in labels or predictions."""
    classes = sorted(set(labels) | set(predictions)) if num_labels is None else range(num_labels)
    scores = []
    for c in classes:
        tp = sum(1 for p, y in zip(predictions, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(predictions, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(predictions, labels) if p != c and y == c)
        if tp + fp + fn == 0:
            continue  # class absent from both: contributes nothing rather than a free 1.0
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_labels: int | None = None) -> dict:
    return {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels, num_labels)}


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp of the mean per-token negative log-likelihood (natural log)."""
    if total_tokens <= 0:
        raise ValueError("perplexity needs at least one predicted token")
    return math.exp(total_nll / total_tokens)


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first word, last word) of every entity in a BIO sequence, read as conlleval reads it:
    an I- tag that does not continue an entity of its type starts a new one."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, name = tag.partition("-")
        continues = prefix == "I" and kind == name and start is not None
        if start is not None and not continues:
            spans.add((kind, start, i - 1))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, name
    return spans


def entity_metrics(predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> dict:
    """Entity-level precision, recall and F1 (micro over all entities), as CoNLL scores NER."""
    tp = n_pred = n_gold = 0
    for p, g in zip(predicted, gold):
        p_spans, g_spans = entity_spans(p), entity_spans(g)
        tp += len(p_spans & g_spans)
        n_pred += len(p_spans)
        n_gold += len(g_spans)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
