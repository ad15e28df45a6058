"""Backbone freezing for the classic fine-tuning baselines (no adapter).

- `all`: the backbone is frozen; only the task head trains (linear probe).
- `none`: everything trains (full fine-tuning).
- `bottom:N`: the embeddings and the lowest N transformer layers are frozen; the rest trains.
"""

from __future__ import annotations

import re

import torch

from ..errors import UserInputError

FREEZE_PATTERN = re.compile(r"^(all|none|bottom:\d+)$")


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer blocks: the longest ModuleList in the model."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise UserInputError("freeze: bottom:N needs a model with a list of transformer layers; none was found")
    return max(lists, key=len)


def apply_freeze(model: torch.nn.Module, mode: str, head_modules: list[str]) -> None:
    """Set requires_grad on every parameter for `mode`; head parameters always train."""
    if not FREEZE_PATTERN.match(mode):
        raise UserInputError(f"freeze: {mode!r} is not known; use all, none or bottom:N")
    is_head = lambda name: any(name == h or name.startswith(h + ".") for h in head_modules)  # noqa: E731
    if mode == "all":
        for name, param in model.named_parameters():
            param.requires_grad = is_head(name)
        return
    for param in model.parameters():
        param.requires_grad = True
    if mode.startswith("bottom:"):
        n = int(mode.split(":")[1])
        layers = transformer_layers(model)
        if n > len(layers):
            raise UserInputError(f"freeze: bottom:{n} asks for more layers than the model's {len(layers)}")
        model.get_input_embeddings().requires_grad_(False)
        for name, module in model.named_modules():
            if name.split(".")[-1] == "embeddings":  # BERT-style: positions, token types, their norm
                module.requires_grad_(False)
        for layer in list(layers)[:n]:
            layer.requires_grad_(False)
