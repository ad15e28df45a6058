"""LoRA through peft: the recipe's `adapter:` section, injection into a (quantized) model."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import UserInputError

HEAD_MODULES = ("lm_head", "classifier", "score")  # output layers: trained in full or frozen, never LoRA'd


class LoraSpec(BaseModel):
    """The `adapter:` section for `method: lora`."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["lora"] = Field("lora", description="lora | bottleneck | prefix")
    r: int = Field(16, ge=1, description="rank")
    alpha: float = Field(32.0, gt=0, description="the delta is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="or a list of layer names, e.g. [q_proj, v_proj]")
    dora: bool = Field(False, description="weight-decomposed LoRA (Liu et al. 2024)")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Full names of every linear layer (plain, 4-bit, 8-bit, GPT-2 Conv1D) outside the output heads."""
    from transformers.pytorch_utils import Conv1D

    names = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and name.split(".")[-1] not in HEAD_MODULES:
            names.append(name)
    return names


def resolve_target_modules(model: torch.nn.Module, target_modules: str | list[str]) -> list[str]:
    """Leaf names of the layers to adapt; `all-linear` means every linear layer but the heads."""
    linear = linear_module_names(model)
    leaves = sorted({name.split(".")[-1] for name in linear})
    if target_modules == "all-linear":
        return leaves
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    missing = [t for t in wanted if t not in leaves and not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        raise UserInputError(
            f"adapter.target_modules: {missing} match no linear layer of this model; its linear layers are "
            f"named {leaves} (or use all-linear)"
        )
    return wanted


def inject_lora(model: torch.nn.Module, spec: LoraSpec, task: str, head_modules: list[str]):
    """Wrap `model` with fresh LoRA weights; the task's head (if any) is trained in full and saved."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=resolve_target_modules(model, spec.target_modules),
        use_dora=spec.dora,
        modules_to_save=head_modules or None,
        task_type="CAUSAL_LM" if task == "causal_lm" else None,
    )
    return get_peft_model(model, config)
