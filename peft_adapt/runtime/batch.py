"""Which adapter each row of a batch uses: data only, computed once per call, read by every adapted site."""

from __future__ import annotations

import torch


class AdapterBatch:
    """Per-row slot indices (slot 0 is "no adapter") and how far each method's stacks must reach for them.

    Built on every call, so it stays cheap: the per-row index tensor is made only when a layer needs it (a batch
    whose rows all use one slot never does).
    """

    __slots__ = ("slot_list", "single", "extents", "_device", "_slots")

    def __init__(self, slot_list: tuple[int, ...], single: int | None, extents: dict[str, int], device):
        self.slot_list = slot_list  # one slot per row
        self.single = single  # the one slot every row uses, if they all use the same
        self.extents = extents  # per method: the largest extent (LoRA rank, bottleneck size) among the batch's slots
        self._device = device
        self._slots: torch.Tensor | None = None

    @classmethod
    def build(cls, slots: list[int], methods: dict[int, tuple[str, int]], device) -> "AdapterBatch":
        """`methods`: slot -> (its method, its extent)."""
        distinct = set(slots)
        extents: dict[str, int] = {}
        for slot in distinct:
            if slot in methods:
                name, extent = methods[slot]
                extents[name] = max(extents.get(name, 0), extent, 1)
        single = next(iter(distinct)) if len(distinct) == 1 else None
        return cls(tuple(slots), single, extents, device)

    @property
    def slots(self) -> torch.Tensor:
        """[batch] int64 on the model's device."""
        if self._slots is None:
            self._slots = torch.tensor(self.slot_list, dtype=torch.long, device=self._device)
        return self._slots

    def extent(self, method: str) -> int:
        return self.extents.get(method, 0)
