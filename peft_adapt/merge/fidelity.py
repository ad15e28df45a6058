"""How closely an exported model computes what the unmerged model computes, on probe text."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import read_rows
from ..errors import UserInputError
from ..training.recipe import Recipe

BLOCK = 128


def compare_logits(found: torch.Tensor, expected: torch.Tensor) -> dict:
    """Max and mean |logit difference| and the share of positions whose top-1 token agrees."""
    found, expected = found.float(), expected.float()
    diff = (found - expected).abs()
    return {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "top1_agreement": float((found.argmax(-1) == expected.argmax(-1)).float().mean()),
    }


def _probe_texts(manifest, probe: str | Path | None) -> list[str]:
    if probe is not None:
        rows = read_rows(Path(probe))
        texts = [r.get("text") or r.get("prompt", "") + r.get("completion", "") for _, r in rows]
        if not any(texts):
            raise UserInputError(f"probe file {probe}: no row has a `text` (or prompt + completion)")
        return [t for t in texts if t]
    # the adapter's own eval data, if it is still where the recipe said
    try:
        recipe = Recipe.model_validate(manifest.recipe)
        spec = recipe.domains.get(manifest.domain)
        for value in (spec.eval, spec.test, spec.train) if spec else ():
            if value and recipe.data_path(value).exists():
                rows = read_rows(recipe.data_path(value))
                return [r["text"] for _, r in rows if isinstance(r.get("text"), str)]
    except Exception:  # an imported or merged adapter has no full recipe: fall through to built-in text
        pass
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [topics[k] for k in sorted(topics)]


def probe_token_ids(tokenizer, manifest, probe: str | Path | None, tokens: int) -> torch.Tensor:
    """[blocks, 128] token ids: `tokens` tokens of probe text packed into blocks."""
    ids: list[int] = []
    for text in _probe_texts(manifest, probe):
        ids += tokenizer(text)["input_ids"]
        if len(ids) >= tokens:
            break
    blocks = max(1, min(len(ids), tokens) // BLOCK)
    if len(ids) < BLOCK:
        raise UserInputError(f"the probe text has only {len(ids)} tokens; give a longer --probe file")
    return torch.tensor(ids[: blocks * BLOCK]).view(blocks, BLOCK)
