"""Reading a peft folder's weights ourselves (never through peft's loader), shared by the peft-based methods."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import UserInputError
from ..formats import ADAPTER_WEIGHTS
from .base import head_name

_WRAPPER = "base_model.model."
_SCORE_KEY = re.compile(r"^score(?:\.modules_to_save\.[^.]+)?\.(weight|bias)$")  # transformers' decoder classifiers
_MLM_HEAD = "mlm_head."  # a domain adapter's masked-LM head: it trained the adapter; nothing served reads it


def read_peft_state(folder: Path, strip_prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter tensors keyed by their path in the base model, the task head: `base.head_name`).
    `strip_prefix` drops a wrapper's prefix from the paths (`encoder.` of our classifier, served on the bare encoder)."""
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise UserInputError(f"{folder}: missing {ADAPTER_WEIGHTS}")
    state, head = {}, {}
    for key, tensor in load_file(str(path)).items():
        key = key.removeprefix(_WRAPPER)
        if key.startswith(_MLM_HEAD):
            continue
        if entry := head_name(key) or head_name(key.removeprefix("base_model.")):  # prompt learning saves the latter
            head[entry] = tensor
            continue
        if m := _SCORE_KEY.match(key):
            head[m.group(1)] = tensor
            continue
        state[key.removeprefix(strip_prefix) if strip_prefix else key] = tensor
    return state, head
