"""Between LoRA factors and full weight deltas: delta = scale * B @ A, and back by truncated SVD."""

from __future__ import annotations

import torch


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The `out x in` weight delta of a LoRA pair A [r, in], B [out, r]."""
    return (b.double() @ a.double()).float() * scale


def to_lora(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors (A [rank, in], B [out, rank], scale 1) and the relative error left."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = min(rank, s.shape[0])
    b = (u[:, :rank] * s[:rank]).float()
    a = vh[:rank].float()
    total = float(s.square().sum())
    lost = float(s[rank:].square().sum())
    return a.contiguous(), b.contiguous(), (lost / total) ** 0.5 if total > 0 else 0.0
