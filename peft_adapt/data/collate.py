"""Token-id rows into padded batches (and masked-LM masks drawn per batch)."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100  # label id the loss skips (prompt tokens, padding)


def mask_tokens(ids, maskable, tokenizer, probability: float, generator=None):
    """BERT's masking: each maskable token is chosen with `probability` (at least one per row); of the chosen,
    80% become [MASK], 10% a random token, 10% stay. Returns (masked ids, labels: the original id where chosen)."""
    import torch

    chosen = (torch.rand(ids.shape, generator=generator) < probability) & maskable
    for row in range(ids.shape[0]):  # a row with nothing chosen would teach nothing: choose one of its tokens
        if not chosen[row].any() and maskable[row].any():
            candidates = maskable[row].nonzero().flatten()
            chosen[row, candidates[torch.randint(len(candidates), (1,), generator=generator)]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    draw = torch.rand(ids.shape, generator=generator)
    masked = ids.clone()
    masked[chosen & (draw < 0.8)] = tokenizer.mask_token_id
    swap = chosen & (draw >= 0.8) & (draw < 0.9)
    masked[swap] = torch.randint(len(tokenizer), ids.shape, generator=generator)[swap]
    return masked, labels


def pad_batch(features: list[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Collate tokenized features into tensors; labels of padding are IGNORE_INDEX."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    has_labels = "labels" in features[0]  # unlabeled target text for domain adaptation has none
    # labels as long as their inputs (a causal LM's), or a decoder's own sequence (seq2seq: padded to its own width)
    label_width = max((len(f["labels"]) for f in features if not isinstance(f.get("labels", 0), int)), default=width)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:  # word bookkeeping of token classification stays out of the batch
        gap = width - len(f["input_ids"])
        pad = lambda seq, value: ([value] * gap + seq) if padding_side == "left" else (seq + [value] * gap)  # noqa: E731
        batch["input_ids"].append(pad(list(f["input_ids"]), pad_token_id))
        batch["attention_mask"].append(pad(list(f["attention_mask"]), 0))
        if has_labels:
            labels = f["labels"]
            if not isinstance(labels, int):
                fill = [IGNORE_INDEX] * (label_width - len(labels))
                labels = fill + list(labels) if padding_side == "left" else list(labels) + fill
            batch["labels"].append(labels)
    return {k: torch.tensor(v) for k, v in batch.items() if v}


@dataclass
class Collator:
    pad_token_id: int
    padding_side: str = "right"

    def __call__(self, features: list[dict]) -> dict:
        return pad_batch(features, self.pad_token_id, self.padding_side)


@dataclass
class MaskingCollator:
    """Pads like `Collator`, then masks the rows that carry no labels yet (training rows, masked afresh in every
    batch from torch's seeded generator); rows masked at tokenization (eval, test) are kept as they are."""

    tokenizer: object
    probability: float

    def __call__(self, features: list[dict]) -> dict:
        import torch

        if "labels" in features[0]:
            return pad_batch(features, self.tokenizer.pad_token_id)
        batch = pad_batch(features, self.tokenizer.pad_token_id)
        ids = batch["input_ids"]
        special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)))
        maskable = batch["attention_mask"].bool() & ~torch.isin(ids, special)
        batch["input_ids"], batch["labels"] = mask_tokens(ids, maskable, self.tokenizer, self.probability)
        return batch
