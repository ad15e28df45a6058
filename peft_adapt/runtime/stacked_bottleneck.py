"""A sublayer followed by every resident bottleneck adapter, stacked: one gathered bmm pair per batch.

Stacks per site: down [slots, size_max, hidden] (+ bias), up [slots, hidden, size_max] (+ bias); slot 0 and
every slot of another method hold zeros, so their rows get `up(act(0)) + 0 = 0` added: nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from ..methods.bottleneck import ACTIVATIONS
from .stacked_lora import BatchContext


class StackedBottleneck(nn.Module):
    def __init__(self, base_layer: nn.Module, hidden: int, context: BatchContext, capacity: int, size: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base_layer = base_layer
        self.hidden = hidden
        self.context = context
        self.activations = ["relu"] * capacity
        z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.register_buffer("down", z(capacity, size, hidden), persistent=False)
        self.register_buffer("down_bias", z(capacity, size), persistent=False)
        self.register_buffer("up", z(capacity, hidden, size), persistent=False)
        self.register_buffer("up_bias", z(capacity, hidden), persistent=False)

    def resize(self, capacity: int, size: int) -> None:
        old_capacity, old_size = self.down.shape[0], self.down.shape[1]
        if (capacity, size) == (old_capacity, old_size):
            return
        down, up = self.down.new_zeros(capacity, size, self.hidden), self.up.new_zeros(capacity, self.hidden, size)
        down_bias, up_bias = self.down_bias.new_zeros(capacity, size), self.up_bias.new_zeros(capacity, self.hidden)
        down[:old_capacity, :old_size] = self.down
        up[:old_capacity, :, :old_size] = self.up
        down_bias[:old_capacity, :old_size] = self.down_bias
        up_bias[:old_capacity] = self.up_bias
        self.down, self.up, self.down_bias, self.up_bias = down, up, down_bias, up_bias
        self.activations += ["relu"] * (capacity - len(self.activations))

    @torch.no_grad()
    def write(self, slot: int, down, down_bias, up, up_bias, activation: str) -> None:
        size = down.shape[0]
        if down.shape[1] != self.hidden or up.shape != (self.hidden, size):
            raise ValueError(f"bottleneck shapes down{tuple(down.shape)} up{tuple(up.shape)} do not fit hidden size {self.hidden}")
        self.clear(slot)
        self.down[slot, :size] = down.to(self.down.dtype)
        self.down_bias[slot, :size] = down_bias.to(self.down.dtype)
        self.up[slot, :, :size] = up.to(self.up.dtype)
        self.up_bias[slot] = up_bias.to(self.up.dtype)
        self.activations[slot] = activation

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        for t in (self.down, self.down_bias, self.up, self.up_bias):
            t[slot].zero_()

    def _act(self, h: torch.Tensor, slots: list[int]) -> torch.Tensor:
        kinds = {self.activations[s] for s in slots}
        if len(kinds) == 1:
            return ACTIVATIONS[kinds.pop()](h)
        out = torch.zeros_like(h)  # rows of different activations: each row through its own
        for kind in kinds:
            rows = torch.tensor([self.activations[s] == kind for s in slots], device=h.device)
            out[rows] = ACTIVATIONS[kind](h[rows])
        return out

    def forward(self, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(*args, **kwargs)
        batch = self.context.current
        if batch is None or batch.bottleneck == 0:
            return y
        b = batch.bottleneck
        yc = y.to(self.down.dtype)
        if batch.single is not None:
            s = batch.single
            h = self._act(yc @ self.down[s, :b].T + self.down_bias[s, :b], [s])
            return y + (h @ self.up[s, :, :b].T + self.up_bias[s]).to(y.dtype)
        slots = batch.slots
        y3 = yc.reshape(y.shape[0], -1, self.hidden)
        h = torch.bmm(y3, self.down[:, :b].index_select(0, slots).transpose(1, 2))
        h = self._act(h + self.down_bias[:, :b].index_select(0, slots).unsqueeze(1), batch.slot_list)
        delta = torch.bmm(h, self.up[:, :, :b].index_select(0, slots).transpose(1, 2))
        delta = delta + self.up_bias.index_select(0, slots).unsqueeze(1)
        return y + delta.view(y.shape).to(y.dtype)
