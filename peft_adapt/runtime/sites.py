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

    @property
    def weight(self):
        """The base layer's: models that read their layer's weight (T5's feed-forward casts to its dtype) see it, as
        through peft's wrapped layers."""
        return self.base_layer.weight

    def add(self, method: str, component: StackComponent) -> None:
        self.components[method] = component

    def forward(self, x, *args, **kwargs):
        batch = self.context.current
        if batch is None:
            return self.base_layer(x, *args, **kwargs)
        active = [c for name, c in self.components.items() if batch.extent(name)]
        flat = _flattened(x, batch)  # tokens as [rows x tokens, features] (OPT's MLP): components see them by row
        xs = x.view(len(batch.slot_list), -1, x.shape[-1]) if flat else x
        for component in active:
            if component.stage == INPUT:
                xs = component.apply(xs, batch).to(x.dtype)
        y = self.base_layer(xs.reshape(x.shape) if flat else xs, *args, **kwargs)
        ys = y.view(len(batch.slot_list), -1, y.shape[-1]) if flat else y
        for component in active:
            if component.stage == DELTA:
                ys = ys + component.apply(xs, batch).to(y.dtype)
        for component in active:
            if component.stage == OUTPUT:
                ys = component.apply(ys, batch)
        return ys.reshape(y.shape) if flat else ys


def _flattened(x, batch: AdapterBatch) -> bool:
    """True when a mixed batch's rows reach this layer flattened into one token dimension; refused when the tokens
    cannot be mapped back to rows (packed sequences of unequal lengths)."""
    rows = len(batch.slot_list)
    if batch.single is not None or x.dim() != 2 or x.shape[0] == rows:
        return False
    if x.shape[0] % rows:
        raise RuntimeError(f"this layer takes {x.shape[0]} tokens flattened from a batch of {rows} rows: they cannot "
                           f"be mapped to rows, so rows of different adapters cannot share this batch")
    return True
