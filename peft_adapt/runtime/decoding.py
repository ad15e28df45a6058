"""Token-by-token decoding with a KV cache, for a left-padded batch whose rows may use different adapters.

The runtime's own loop rather than `generate()`: it yields every step's tokens as they come (so a server
can stream a batch of requests, each to its own client), and rows stop at their own end-of-sequence.
Greedy by default; sampling with temperature, top-k and top-p from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: subtracted from every token generated at least once
    frequency_penalty: float = 0.0  # and this times the number of times it was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    @property
    def adjusts(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


def per_row(sampling: Sampling | list[Sampling], rows: int) -> list[Sampling]:
    """One Sampling per row: a batch's rows may each sample their own way (their own request's settings)."""
    samplings = [sampling] * rows if isinstance(sampling, Sampling) else list(sampling)
    if len(samplings) != rows:
        raise ValueError(f"{len(samplings)} sampling settings for {rows} rows")
    return samplings


def generators_for(samplings: list[Sampling]) -> list[torch.Generator | None]:
    """Each seeded row its own generator, so its draws never depend on its batch-mates (a seeded request gives the
    same tokens alone and in any batch); unseeded rows draw from the global generator."""
    return [torch.Generator().manual_seed(s.seed) if s.do_sample and s.seed is not None else None for s in samplings]


def adjust_rows(logits: torch.Tensor, samplings: list[Sampling], generated: list[list[int]]) -> torch.Tensor:
    """[batch, vocab] logits with each row's logit bias and presence/frequency penalties applied (over the tokens it
    generated so far), as OpenAI defines them: logit - frequency x count - presence x (count > 0) + bias. Rows without
    any are left as they are (and the tensor itself when no row has any)."""
    rows = [i for i, s in enumerate(samplings) if s.adjusts]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        sampling, row = samplings[i], logits[i]
        if generated[i] and (sampling.presence_penalty or sampling.frequency_penalty):
            seen = torch.tensor(generated[i], device=row.device)
            counts = torch.zeros_like(row).index_add_(0, seen, torch.ones(len(seen), dtype=row.dtype, device=row.device))
            row -= sampling.frequency_penalty * counts + sampling.presence_penalty * (counts > 0).to(row.dtype)
        for token, bias in sampling.logit_bias:
            row[token] += bias
    return logits


def choose_next_rows(logits: torch.Tensor, samplings: list[Sampling],
                     generators: list[torch.Generator | None]) -> torch.Tensor:
    """[batch] next tokens, each row chosen with its own settings and generator."""
    tokens = logits.argmax(-1)
    for i, (sampling, generator) in enumerate(zip(samplings, generators)):
        if sampling.do_sample:
            tokens[i] = choose_next(logits[i : i + 1], sampling, generator)[0]
    return tokens


def choose_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """[batch] next tokens from [batch, vocab] logits."""
    if not sampling.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(sampling.temperature, 1e-5)
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) > sampling.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def decode(forward: Callable[..., torch.Tensor], ids: torch.Tensor, mask: torch.Tensor,
           sampling: Sampling | list[Sampling], eos_token_id: int | None,
           max_position: int | None = None) -> Iterator[list[int | None]]:
    """Yield, per step, each row's new token (None once the row has ended). `sampling`: one for every row, or one
    per row (each row then samples with its own settings and, when seeded, its own generator); the batch runs to
    its longest `max_new_tokens`.

    `forward(input_ids, attention_mask, position_ids, cache)` returns the logits of the last position;
    `ids`/`mask` are left-padded prompts.
    """
    from transformers import DynamicCache

    samplings = per_row(sampling, ids.shape[0])
    shared = isinstance(sampling, Sampling)  # one request's rows: one generator, as before
    generators = ([torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None] * ids.shape[0]
                  if shared else generators_for(samplings))
    limits = torch.tensor([s.max_new_tokens for s in samplings], device=ids.device)
    least = torch.tensor([s.min_new_tokens for s in samplings], device=ids.device)
    steps = int(limits.max())
    cache = DynamicCache()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = forward(ids, mask, positions, cache)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    generated: list[list[int]] = [[] for _ in samplings]
    for step in range(steps):
        logits = adjust_rows(logits, samplings, generated)
        if eos_token_id is not None and bool((step < least).any()):
            logits[step < least, eos_token_id] = float("-inf")
        tokens = choose_next(logits, sampling, generators[0]) if shared else \
            choose_next_rows(logits, samplings, generators)
        chosen = tokens.tolist()
        for row, token in zip(generated, chosen):
            row.append(token)
        yield [None if done else int(t) for t, done in zip(chosen, finished.tolist())]
        if eos_token_id is not None:
            finished |= tokens == eos_token_id
        finished |= step + 1 >= limits
        if bool(finished.all()) or step + 1 == steps:
            return
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        if max_position is not None:  # a row past its own limit runs on with the batch; its tokens are not used
            positions = positions.clamp(max=max_position - 1)
        logits = forward(tokens[:, None], mask, positions, cache)


class TextStream:
    """Tokens in, text out, as a client should see it stream: pieces are sent once they are final (never half a
    character, never the start of what may become a stop sequence), and the stream stops at the first stop
    sequence, which is not sent."""

    def __init__(self, tokenizer, stops: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stops = [s for s in (stops or []) if s]
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """The new text this token makes final ('' if none yet); `stopped` turns True at a stop sequence."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._send(text[:cut])
        final = len(text) - self.holdback
        if text.endswith("\ufffd"):  # the bytes of a character still arriving
            final = min(final, len(text) - 1)
        return self._send(text[: max(final, len(self.sent))])

    def finish(self) -> str:
        """What was held back, once no more tokens come."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return self._send(text)

    def _send(self, upto: str) -> str:
        if not upto.startswith(self.sent):  # decoding revised text already sent: send nothing until it settles
            return ""
        piece, self.sent = upto[len(self.sent):], upto
        return piece
