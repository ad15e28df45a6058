"""Reading a peft folder's weights ourselves (never through peft's loader), shared by the peft-based methods."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import UserInputError
from ..formats import ADAPTER_WEIGHTS

_WRAPPER = "base_model.model."
_HEAD_KEY = re.compile(r"^(classifier|score)(?:\.modules_to_save\.[^.]+)?\.(weight|bias)$")
_MLM_HEAD = "mlm_head."  # a domain adapter's masked-LM head: it trained the adapter; nothing served reads it


def read_peft_state(folder: Path, strip_prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter tensors keyed by their path in the base model, the classification head's weight and bias).
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
        if m := _HEAD_KEY.match(key):
            head[m.group(2)] = tensor
            continue
        state[key.removeprefix(strip_prefix) if strip_prefix else key] = tensor
    return state, head
