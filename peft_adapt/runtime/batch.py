"""Which adapter each row of a batch uses: data only, computed once per call, read by every adapted site."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdapterBatch:
    """Per-row slot indices (slot 0 is "no adapter") and how far each method's stacks must reach for them."""

    slots: torch.Tensor  # [batch] int64 on the model's device
    slot_list: tuple[int, ...]  # the same, as Python ints
    single: int | None  # the one slot every row uses, if they all use the same
    extents: dict[str, int]  # per method: the largest extent (LoRA rank, bottleneck size) among the batch's slots

    @classmethod
    def build(cls, slots: list[int], methods: dict[int, tuple[str, int]], device: torch.device) -> "AdapterBatch":
        """`methods`: slot -> (its method, its extent)."""
        distinct = sorted(set(slots))
        extents: dict[str, int] = {}
        for slot in distinct:
            if slot in methods:
                name, extent = methods[slot]
                extents[name] = max(extents.get(name, 0), max(extent, 1))
        single = distinct[0] if len(distinct) == 1 else None
        return cls(torch.tensor(slots, dtype=torch.long, device=device), tuple(slots), single, extents)

    def extent(self, method: str) -> int:
        return self.extents.get(method, 0)
