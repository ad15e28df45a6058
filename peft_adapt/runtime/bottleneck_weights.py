"""Bottleneck adapter weights read from a folder into plain tensors, per site, ready for the stacks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserInputError
from ..methods.bottleneck import WEIGHTS_FILE, read_bottleneck_config


@dataclass
class BottleneckWeights:
    """For every site: down [size, hidden], down bias [size], up [hidden, size], up bias [hidden]."""

    sites: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    activation: str
    head: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return max(down.shape[0] for down, _, _, _ in self.sites.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for site in self.sites.values() for t in site) + sum(
            t.numel() * t.element_size() for t in self.head.values())


def read_bottleneck_weights(folder: str | Path, strip_prefix: str = "") -> BottleneckWeights:
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_bottleneck_config(folder)
    state = load_file(str(folder / WEIGHTS_FILE))
    sites = {}
    for path in config["sites"]:
        try:
            parts = tuple(state[f"{path}.adapter.{k}"] for k in ("down.weight", "down.bias", "up.weight", "up.bias"))
        except KeyError as exc:
            raise UserInputError(f"{folder}: {WEIGHTS_FILE} lacks {exc.args[0]}") from None
        key = path[len(strip_prefix):] if strip_prefix and path.startswith(strip_prefix) else path
        sites[key] = parts
    head = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("classifier.")}
    return BottleneckWeights(sites, config["activation"], head)
