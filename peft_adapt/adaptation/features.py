"""The features every adaptation method compares: the head's pooled features (or for causal LM the mean of the last
hidden states), L2-normalised, and the target domain's text read without its labels."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import read_rows, text_of
from ..models.heads import pool_hidden


def feature_kwargs(task: str) -> dict:
    return {"output_hidden_states": True} if task == "causal_lm" else {"return_pooled": True}


def pooled_features(outputs, attention_mask: torch.Tensor, task: str) -> torch.Tensor:
    """[batch, hidden]: the head's pooled features (or for causal LM the mean of the last hidden states),
    L2-normalised as sentence embeddings are, so no objective can be met by growing or shrinking them: with
    raw features the DANN domain loss grew without bound (17-25) and took the task with it."""
    if task == "causal_lm":
        hidden = outputs.hidden_states[-1]
        features = pool_hidden(hidden.float(), attention_mask[:, -hidden.shape[1]:], "mean")
    else:
        features = outputs.hidden_states[0]
    return torch.nn.functional.normalize(features.float(), dim=-1)


def read_target_texts(path: Path, text_field: str = "text", max_rows: int | None = None) -> list[str]:
    """The target domain's text only: every other field of the file (labels included) is never read."""
    rows = read_rows(path, "train")
    texts = [text_of(row, text_field, f"row {n}", path) for n, row in rows]
    return texts[:max_rows] if max_rows else texts


def tokenize_target(texts: list[str], tokenizer, max_length: int) -> list[dict]:
    """The target's text tokenized like the source's rows (no labels)."""
    return [{k: v for k, v in tokenizer(t, truncation=True, max_length=max_length).items()
             if k in ("input_ids", "attention_mask")} for t in texts]
