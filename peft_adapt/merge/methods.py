"""Adapter combination methods: pure functions from the parents' weight deltas to one merged delta.

Each takes the per-module deltas `[delta_1, ..., delta_n]` (one `out x in` tensor per parent, zeros
where a parent does not adapt the module), their `weights`, a `density` and a torch `generator`, and
returns the merged delta. No I/O: loading, re-compressing to LoRA and saving live in `combine.py`.
Definitions follow the papers as peft's `merge_utils` implements them:
- linear: sum_i w_i delta_i (task arithmetic; exact, re-compressed without loss at the default rank);
- magnitude_prune: keep each delta's `density` fraction of largest-magnitude entries, then linear;
- ties (Yadav et al. 2023): magnitude-trim each delta, elect each entry's sign from the sum of the trimmed
  deltas, then average the weighted entries that agree with the elected sign (disjoint mean);
- dare_linear (Yu et al. 2023): drop each entry with probability 1 - density, rescale survivors by
  1 / density, then linear;
- dare_ties: the DARE drop and rescale, then TIES' sign election and disjoint mean.
(`cat` and `svd` are representations, not delta arithmetic: see `combine.py`.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the `density` fraction of entries with the largest magnitude."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    if k > 0:
        keep[torch.topk(delta.abs().reshape(-1), k).indices] = True
    return delta * keep.view(delta.shape)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescaled by 1 / density."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) < density
    return delta * keep / density


def _weighted(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return torch.stack([d * w for d, w in zip(deltas, weights)])


def _disjoint_mean(trimmed: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    stacked = torch.stack(trimmed)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agrees = stacked.sign() == elected
    weighted = _weighted(trimmed, weights) * agrees
    return weighted.sum(0) / agrees.sum(0).clamp(min=1)


def linear(deltas, weights, density=1.0, generator=None):
    return _weighted(deltas, weights).sum(0)


def magnitude_prune(deltas, weights, density=1.0, generator=None):
    return linear([magnitude_trim(d, density) for d in deltas], weights)


def ties(deltas, weights, density=1.0, generator=None):
    return _disjoint_mean([magnitude_trim(d, density) for d in deltas], weights)


def dare_linear(deltas, weights, density=1.0, generator=None):
    return linear([random_drop(d, density, generator) for d in deltas], weights)


def dare_ties(deltas, weights, density=1.0, generator=None):
    return _disjoint_mean([random_drop(d, density, generator) for d in deltas], weights)


DeltaMethod = Callable[[list[torch.Tensor], list[float], float, torch.Generator | None], torch.Tensor]

DELTA_METHODS: dict[str, DeltaMethod] = {
    "linear": linear,
    "magnitude_prune": magnitude_prune,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
}
