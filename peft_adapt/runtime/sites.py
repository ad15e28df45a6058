"""An adapted site: one layer of the base with every method's stacked adapters around it.

Each method's component acts at its stage (see `methods/base.py`): INPUT components adapt what the layer takes,
DELTA components add to its output from that input, OUTPUT components adapt its output. A component whose method no
row of the batch uses is skipped; rows of other methods pass through every component unchanged.
"""

from __future__ import annotations

from torch import nn

from ..methods.base import DELTA, INPUT, OUTPUT, StackComponent
from .batch import AdapterBatch


class BatchContext:
    """The batch being run, shared by every site of one runtime (set under the runtime's lock)."""

    current: AdapterBatch | None = None


class AdaptedSite(nn.Module):
    def __init__(self, base_layer: nn.Module, context: BatchContext):
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.components = nn.ModuleDict()  # method name -> its stack here

    def add(self, method: str, component: StackComponent) -> None:
        self.components[method] = component

    def forward(self, x, *args, **kwargs):
        batch = self.context.current
        if batch is None:
            return self.base_layer(x, *args, **kwargs)
        active = [c for name, c in self.components.items() if batch.extent(name)]
        for component in active:
            if component.stage == INPUT:
                x = component.apply(x, batch).to(x.dtype)
        y = self.base_layer(x, *args, **kwargs)
        for component in active:
            if component.stage == DELTA:
                y = y + component.apply(x, batch).to(y.dtype)
        for component in active:
            if component.stage == OUTPUT:
                y = component.apply(y, batch)
        return y
