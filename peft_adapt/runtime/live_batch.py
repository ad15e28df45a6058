"""Rows that decode together through one KV cache, joining and leaving between steps (continuous batching).

A `Prefill` runs new rows' prompts (left-padded among themselves) into their own cache, a chunk of columns per call,
so a long prompt is read between the running rows' decode steps rather than before them. A `LiveBatch` holds the
running rows: their cache (left-padded to the longest row), attention mask, next positions and next-token logits.
A finished prefill joins it by padding the narrower of the two caches on the left; rows that end leave it, and the
columns no remaining row uses are cut. Every row keeps its own positions, sampling settings and generator, so what a
row generates does not depend on when it joined or who else runs (up to the float rounding of a padded batch; with
`batch_invariant` each row is its own batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .decoding import Sampling, adjust_rows, choose_next_rows


@dataclass
class LiveRow:
    job: object  # the GenerationJob it serves
    prompt: list[int]
    adapter: object  # its ResidentAdapter, None for the base
    sampling: Sampling
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    reserved: int = field(init=False)  # cache positions it may come to hold: prompt + max_new_tokens

    def __post_init__(self):
        self.reserved = len(self.prompt) + self.sampling.max_new_tokens


def _cache_layers(cache) -> list:
    from transformers.cache_utils import DynamicLayer

    layers = list(cache.layers)
    for layer in layers:
        if type(layer) is not DynamicLayer:  # sliding or quantized layers keep state a row splice would break
            raise NotImplementedError(f"continuous batching needs a plain dynamic cache, not {type(layer).__name__}")
    return layers


class Prefill:
    """New rows' prompts, read into their own cache `chunk` columns at a time (all at once when chunk is None)."""

    def __init__(self, runtime, rows: list[LiveRow]):
        from transformers import DynamicCache

        self.runtime, self.rows = runtime, rows
        width = max(len(r.prompt) for r in rows)
        pad = runtime.tokenizer.pad_token_id
        ids = [[pad] * (width - len(r.prompt)) + list(r.prompt) for r in rows]
        mask = [[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows]
        self.ids = torch.tensor(ids, device=runtime.device)
        self.mask = torch.tensor(mask, device=runtime.device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.batch = runtime._stacked_batch([r.adapter for r in rows])
        self.cache = DynamicCache()
        self.read = 0  # columns read so far
        self.logits: torch.Tensor | None = None  # the next-token logits, once every column is read

    @property
    def remaining(self) -> int:
        return self.ids.shape[1] - self.read

    def step(self, chunk: int | None) -> bool:
        """Read the next chunk of columns; True once the whole prompt is read."""
        end = self.ids.shape[1] if chunk is None else min(self.ids.shape[1], self.read + chunk)
        logits = self.runtime._step(self.batch, self.ids[:, self.read : end], self.mask[:, :end],
                                    self.positions[:, self.read : end], self.cache)
        self.read = end
        if self.remaining == 0:
            self.logits = logits
            return True
        return False


class LiveBatch:
    def __init__(self, runtime):
        self.runtime = runtime
        self.rows: list[LiveRow] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [rows, columns]
        self.positions: torch.Tensor | None = None  # [rows]: each row's last position so far
        self.logits: torch.Tensor | None = None  # [rows, vocab]: what each row chooses its next token from
        self.batch = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def join(self, prefill: Prefill) -> None:
        """Take a finished prefill's rows, cache and logits."""
        new_mask = prefill.mask
        if not self.rows:
            self.cache, self.mask = prefill.cache, new_mask
            self.positions, self.logits = prefill.positions[:, -1], prefill.logits
        else:
            width = max(self.width, new_mask.shape[1])
            for mine, theirs in zip(_cache_layers(self.cache), _cache_layers(prefill.cache)):
                mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
                mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
            self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(new_mask, width, 1)])
            self.positions = torch.cat([self.positions, prefill.positions[:, -1]])
            self.logits = torch.cat([self.logits, prefill.logits])
        self.rows += prefill.rows
        self._rebatch()

    def choose(self) -> list[int]:
        """Each row's next token, with its own settings, penalties and generator (EOS held off below
        min_new_tokens)."""
        samplings = [r.sampling for r in self.rows]
        logits = adjust_rows(self.logits, samplings, [r.generated for r in self.rows])
        eos = self.runtime.tokenizer.eos_token_id
        early = [i for i, r in enumerate(self.rows) if len(r.generated) < r.sampling.min_new_tokens]
        if eos is not None and early:
            logits = logits.clone() if logits is self.logits else logits
            logits[early, eos] = float("-inf")
        tokens = choose_next_rows(logits, samplings, [r.generator for r in self.rows]).tolist()
        for row, token in zip(self.rows, tokens):
            row.generated.append(token)
        return tokens

    def keep(self, kept: list[int]) -> None:
        """Only these rows stay; the columns no remaining row uses are cut."""
        if len(kept) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in kept]
        if not kept:
            self.cache = self.mask = self.positions = self.logits = self.batch = None
            return
        index = torch.tensor(kept, device=self.mask.device)
        mask = self.mask[index]
        first = int((mask.sum(0) > 0).nonzero()[0])  # the leftmost column some row still uses
        for layer in _cache_layers(self.cache):
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]
        self.mask, self.positions, self.logits = mask[:, first:], self.positions[index], self.logits[index]
        self._rebatch()

    def step(self, tokens: list[int]) -> None:
        """Feed each row its chosen token; the logits of what comes next replace the old ones."""
        ids = torch.tensor(tokens, device=self.mask.device)[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self.positions = self.positions + 1
        self.logits = self.runtime._step(self.batch, ids, self.mask, self.positions[:, None], self.cache)

    def _rebatch(self) -> None:
        self.batch = self.runtime._stacked_batch([r.adapter for r in self.rows])


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
