"""LoRA weights read from an adapter folder into plain tensors, per module, ready to copy into stacks.

Never through peft's loading path: on AVX512-BF16 CPUs, peft loading onto a model that has already
served gives garbage (DESIGN.md, "Known traps"); reading the safetensors ourselves is exact.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter_files import ADAPTER_WEIGHTS, read_adapter_config
from ..errors import UserInputError

_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_HEAD_KEY = re.compile(r"^base_model\.model\.(classifier|score)(?:\.modules_to_save\.[^.]+)?\.(weight|bias)$")


@dataclass
class LoraWeights:
    """One adapter: for every adapted module (path in the base model), A [r, in], B [out, r] and a scale."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # classifier weight/bias, if any

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _, _ in self.modules.values()), default=0)

    @property
    def nbytes(self) -> int:
        lora = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in self.modules.values())
        return lora + sum(t.numel() * t.element_size() for t in self.head.values())


def read_lora_weights(folder: str | Path, strip_prefix: str = "") -> LoraWeights:
    """Read `folder`'s LoRA; module paths lose `strip_prefix` (e.g. `encoder.` for a classifier's encoder)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_adapter_config(folder)
    if str(config.get("peft_type")).upper() != "LORA":
        raise UserInputError(f"{folder}: a {config.get('peft_type')} adapter; the runtime serves LoRA adapters")
    if config.get("use_dora"):
        raise UserInputError(
            f"{folder}: a DoRA adapter; its magnitude vectors cannot be served from stacked LoRA tensors. "
            f"Serve it with peft, or retrain with adapter.dora: false"
        )
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserInputError(f"{folder}: rank_pattern / alpha_pattern adapters are not supported by the runtime yet")
    weights_path = folder / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise UserInputError(f"{folder}: missing {ADAPTER_WEIGHTS}")
    state = load_file(str(weights_path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    head = {}
    for key, tensor in state.items():
        if m := _LORA_KEY.match(key):
            pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
        elif m := _HEAD_KEY.match(key):
            head[m.group(2)] = tensor
        else:
            raise UserInputError(f"{folder}: weight {key!r} is neither a LoRA matrix nor a classification head")
    alpha, rank = float(config["lora_alpha"]), int(config["r"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    modules = {}
    for path, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise UserInputError(f"{folder}: module {path} has lora_{''.join(pair)} without its partner")
        if strip_prefix and path.startswith(strip_prefix):
            path = path[len(strip_prefix):]
        modules[path] = (pair["A"], pair["B"], scale)
    if not modules:
        raise UserInputError(f"{folder}: no LoRA weights in {ADAPTER_WEIGHTS}")
    return LoraWeights(modules, head)


def average_heads(heads: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Classification heads mixed like their adapters, the weights normalised to sum to 1 (weights 1, 0: the first)."""
    if not any(heads):
        return {}
    if not all(heads):
        raise UserInputError("a classification adapter can be combined only with other classification adapters")
    total = sum(weights)
    if total == 0:
        raise UserInputError("the weights of combined classifiers sum to 0; their heads cannot be averaged")
    return {k: sum(h[k].float() * (w / total) for h, w in zip(heads, weights)) for k in heads[0]}


def combine_linearly(parts: list[tuple[LoraWeights, float]]) -> LoraWeights:
    """sum_i w_i * delta_i exactly, as one LoRA: A stacked along the rank, B scaled and concatenated; heads averaged."""
    modules: dict[str, tuple[list, list]] = {}
    for weights, w in parts:
        for path, (a, b, scale) in weights.modules.items():
            entry = modules.setdefault(path, ([], []))
            entry[0].append(a.float())
            entry[1].append(b.float() * (w * scale))
    combined = {path: (torch.cat(a_list), torch.cat(b_list, dim=1), 1.0) for path, (a_list, b_list) in modules.items()}
    return LoraWeights(combined, average_heads([lora.head for lora, _ in parts], [w for _, w in parts]))
