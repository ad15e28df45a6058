"""Which adapter each row of a batch uses: data only, computed once per call, read by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdapterBatch:
    """Per-row slot indices (slot 0 is "no adapter") and what the layers need to pick a kernel."""

    slots: torch.Tensor  # [batch] int64 on the model's device
    slot_list: tuple[int, ...]  # the same, as Python ints
    single: int | None  # the one slot every row uses, if they all use the same
    rank: int  # the largest LoRA rank among the batch's slots (LoRA stacks are sliced to it)
    bottleneck: int  # the largest bottleneck size among them (bottleneck stacks are sliced to it)

    @classmethod
    def build(cls, slots: list[int], ranks: dict[int, int], sizes: dict[int, int], device: torch.device) -> "AdapterBatch":
        distinct = sorted(set(slots))
        rank = max((ranks.get(s, 0) for s in distinct), default=0)
        size = max((sizes.get(s, 0) for s in distinct), default=0)
        single = distinct[0] if len(distinct) == 1 else None
        return cls(torch.tensor(slots, dtype=torch.long, device=device), tuple(slots), single, rank, size)

    @property
    def is_base_only(self) -> bool:
        return self.rank == 0 and self.bottleneck == 0
