"""Which adapter each row of a batch uses: data only, computed once per call, read by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdapterBatch:
    """Per-row slot indices (slot 0 is "no adapter") and what the layers need to pick a kernel."""

    slots: torch.Tensor  # [batch] int64 on the model's device
    single: int | None  # the one slot every row uses, if they all use the same
    rank: int  # the largest rank among the slots in the batch (stacks are sliced to it)
    distinct: int  # number of distinct non-zero slots

    @classmethod
    def build(cls, slots: list[int], ranks: dict[int, int], device: torch.device) -> "AdapterBatch":
        distinct = sorted(set(slots))
        rank = max((ranks.get(s, 0) for s in distinct), default=0)
        single = distinct[0] if len(distinct) == 1 else None
        used = [s for s in distinct if s != 0]
        return cls(torch.tensor(slots, dtype=torch.long, device=device), single, rank, len(used))

    @property
    def is_base_only(self) -> bool:
        return self.rank == 0
