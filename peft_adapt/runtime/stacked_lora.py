"""How a batch's LoRA deltas are computed: one linear layer wrapped with its resident adapters stacked.

For every wrapped layer the runtime keeps `A: [slots, r_max, in]` and `B: [slots, out, r_max]` (the LoRA
scale folded into B); slot 0 is "no adapter" and stays all zeros. A row's delta is
`B[slot] @ (A[slot] @ x)`: when every row uses one slot it is two plain matmuls, otherwise one gathered
batched matmul pair (the BGMV idea of Punica and S-LoRA in plain PyTorch), whatever the number of
distinct adapters. Loading an adapter writes a slot; switching is only a different index.
"""

from __future__ import annotations

import torch
from torch import nn

from .batch import AdapterBatch


class BatchContext:
    """The batch being run, shared by every wrapped layer of one runtime (set under the runtime's lock)."""

    current: AdapterBatch | None = None


class StackedLoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, context: BatchContext, capacity: int, rank: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.context = context
        self.register_buffer("A", torch.zeros(capacity, rank, self.in_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("B", torch.zeros(capacity, self.out_features, rank, dtype=dtype, device=device), persistent=False)

    @property
    def capacity(self) -> int:
        return self.A.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def resize(self, capacity: int, rank: int) -> None:
        """Grow the stacks (more slots, or a larger padded rank), keeping what they hold."""
        if capacity == self.capacity and rank == self.rank:
            return
        A = self.A.new_zeros(capacity, rank, self.in_features)
        B = self.B.new_zeros(capacity, self.out_features, rank)
        A[: self.capacity, : self.rank] = self.A
        B[: self.capacity, :, : self.rank] = self.B
        self.A, self.B = A, B

    @torch.no_grad()
    def write(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        r = a.shape[0]
        if a.shape[1] != self.in_features or b.shape[0] != self.out_features or b.shape[1] != r:
            raise ValueError(
                f"LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit a layer of "
                f"{self.in_features} -> {self.out_features}"
            )
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.A[slot, :r] = a.to(self.A.dtype)
        self.B[slot, :, :r] = (b.float() * scale).to(self.B.dtype)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()

    def slot_nbytes(self) -> int:
        return (self.A[0].numel() + self.B[0].numel()) * self.A.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        batch = self.context.current
        if batch is None or batch.rank == 0:
            return y
        r = batch.rank
        xc = x.to(self.A.dtype)
        if batch.single is not None:
            a = self.A[batch.single, :r]  # [r, in]
            b = self.B[batch.single, :, :r]  # [out, r]
            return y + ((xc @ a.T) @ b.T).to(y.dtype)
        if x.shape[0] != batch.slots.shape[0]:
            raise RuntimeError(f"batch of {x.shape[0]} rows but {batch.slots.shape[0]} adapter slots")
        a = self.A[:, :r].index_select(0, batch.slots)  # [batch, r, in]
        b = self.B[:, :, :r].index_select(0, batch.slots)  # [batch, out, r]
        x3 = xc.reshape(x.shape[0], -1, self.in_features)  # [batch, tokens, in]
        delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2))
        return y + delta.view(*y.shape[:-1], self.out_features).to(y.dtype)
