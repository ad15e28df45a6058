"""A linear-chain CRF over word tags (Lafferty et al. 2001), the output layer of `task.crf: true`.

Emissions come from the token classifier's head at each word's first sub-token; the CRF adds learned transition
scores between consecutive words' tags (and from the start, to the end). BIO is enforced: a transition into `I-X`
from anything but `B-X` or `I-X`, and a sequence starting with `I-X`, score -10,000, so Viterbi never decodes them
(the training data's gold sequences never use them: CoNLL-2003 has none). Trained by the sequences' negative
log-likelihood (the forward algorithm); decoded by Viterbi. Scores in fp32 whatever the base's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

FORBIDDEN = -1e4


def bio_constraints(tags: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(start [T], transitions [T, T]) of 0 where allowed and FORBIDDEN where BIO forbids."""
    start = torch.zeros(len(tags))
    moves = torch.zeros(len(tags), len(tags))
    for j, tag in enumerate(tags):
        if not tag.startswith("I-"):
            continue
        start[j] = FORBIDDEN
        for i, before in enumerate(tags):
            if before[2:] != tag[2:] or before[:2] not in ("B-", "I-"):
                moves[i, j] = FORBIDDEN
    return start, moves


class CRF(nn.Module):
    def __init__(self, tags: list[str]):
        super().__init__()
        count = len(tags)
        self.start = nn.Parameter(torch.zeros(count))
        self.end = nn.Parameter(torch.zeros(count))
        self.transitions = nn.Parameter(torch.zeros(count, count))
        start, moves = bio_constraints(tags)
        self.register_buffer("start_mask", start, persistent=False)
        self.register_buffer("moves_mask", moves, persistent=False)

    def _scores(self):
        return self.start + self.start_mask, self.transitions + self.moves_mask, self.end

    def neg_log_likelihood(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per sequence [B]: log Z - score(gold). `emissions` [B, W, T] (word-aligned, left-packed), `tags` [B, W],
        `mask` [B, W] True for real words (every row has at least one)."""
        emissions = emissions.float()
        start, moves, end = self._scores()
        batch = torch.arange(emissions.shape[0], device=emissions.device)
        gold = start[tags[:, 0]] + emissions[batch, 0, tags[:, 0]]
        alpha = start + emissions[:, 0]  # [B, T]
        for w in range(1, emissions.shape[1]):
            real = mask[:, w]
            step = moves[tags[:, w - 1], tags[:, w]] + emissions[batch, w, tags[:, w]]
            gold = gold + step * real
            nxt = torch.logsumexp(alpha.unsqueeze(2) + moves.unsqueeze(0), dim=1) + emissions[:, w]
            alpha = torch.where(real.unsqueeze(1), nxt, alpha)
        last = tags[batch, mask.sum(1) - 1]
        gold = gold + end[last]
        return torch.logsumexp(alpha + end, dim=1) - gold

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """The best tag sequence of each row's real words (Viterbi)."""
        emissions = emissions.float()
        start, moves, end = self._scores()
        score = start + emissions[:, 0]
        history = []
        for w in range(1, emissions.shape[1]):
            candidates = score.unsqueeze(2) + moves.unsqueeze(0)  # [B, from, to]
            best, came_from = candidates.max(dim=1)
            history.append(came_from)
            score = torch.where(mask[:, w].unsqueeze(1), best + emissions[:, w], score)
        paths = []
        lengths = mask.sum(1).tolist()
        final = (score + end).argmax(1).tolist()
        for row, length in enumerate(lengths):
            path = [final[row]]
            for w in range(length - 1, 0, -1):
                path.append(int(history[w - 1][row, path[-1]]))
            paths.append(path[::-1])
        return paths


def words_of(values: torch.Tensor, word_starts: torch.Tensor, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, ...] values at each row's word starts, left-packed into [B, W, ...], and the [B, W] mask of real words."""
    counts = word_starts.sum(1)
    width = max(int(counts.max()), 1)
    packed = values.new_full((values.shape[0], width, *values.shape[2:]), fill)
    mask = torch.arange(width, device=values.device).unsqueeze(0) < counts.unsqueeze(1)
    packed[mask] = values[word_starts]
    return packed, mask


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
