"""Inputs to padded token ids: texts (tokenized, each cut to its limit as training cut it) or id lists, checked
against the base's positions, padded on either side."""

from __future__ import annotations

import torch

from ..errors import UserInputError


def encode(tokenizer, max_positions: int, inputs, padding_side: str = "right",
           limits: list[int | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask of texts or id lists, padded; with `limits`, each text truncated to its limit."""
    if isinstance(inputs, str):
        raise UserInputError("pass a list of texts (one per row), not a single string")
    if not inputs:
        raise UserInputError("no inputs: pass at least one text")
    if isinstance(inputs[0], str):
        inputs = tokenize(tokenizer, list(inputs), limits)
    for i, row in enumerate(inputs):
        if len(row) > max_positions:
            raise UserInputError(f"input {i} has {len(row)} tokens; this base takes at most {max_positions}")
    width = max(len(row) for row in inputs)
    pad = tokenizer.pad_token_id
    left = padding_side == "left"
    ids = [([pad] * (width - len(r)) + list(r)) if left else (list(r) + [pad] * (width - len(r))) for r in inputs]
    mask = [([0] * (width - len(r)) + [1] * len(r)) if left else ([1] * len(r) + [0] * (width - len(r))) for r in inputs]
    return torch.tensor(ids), torch.tensor(mask)


def tokenize(tokenizer, texts: list[str], limits: list[int | None] | None) -> list[list[int]]:
    """Token ids per text; a text with a limit is cut to it, as training cut it (grouped by limit)."""
    limits = limits or [None] * len(texts)
    rows: list[list[int]] = [[] for _ in texts]
    for limit in set(limits):
        index = [i for i, n in enumerate(limits) if n == limit]
        options = dict(truncation=True, max_length=limit) if limit else {}
        for i, ids in zip(index, tokenizer([texts[i] for i in index], **options)["input_ids"]):
            rows[i] = ids
    return rows
