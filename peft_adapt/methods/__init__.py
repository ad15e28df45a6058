"""Adapter methods behind one small interface: a spec (the recipe's `adapter:` section) and `inject`.

- `lora.py`: LoRA / DoRA through peft; mergeable into base weights.
- `bottleneck.py`: sequential bottleneck adapters (Houlsby, Pfeiffer), our own: peft has none.
- `prefix.py`: prefix tuning through peft.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Discriminator, Tag

from .bottleneck import BottleneckSpec, inject_bottleneck
from .lora import LoraSpec, inject_lora
from .prefix import PrefixSpec, inject_prefix

SPECS = {"lora": LoraSpec, "bottleneck": BottleneckSpec, "prefix": PrefixSpec}
METHODS = tuple(SPECS)


def _method_of(value) -> str:
    """The union's tag: `method:` if given (LoRA when absent)."""
    if isinstance(value, dict):
        return value.get("method", "lora")
    return getattr(value, "method", "lora")


AdapterSpec = Annotated[
    Union[tuple(Annotated[spec, Tag(name)] for name, spec in SPECS.items())],  # noqa: UP007
    Discriminator(_method_of),
]


def inject_adapter(model, spec, task: str, head_modules: list[str], model_type: str | None = None):
    """Return `model` with a fresh, trainable adapter of `spec.method`; the base stays frozen."""
    if spec.method == "lora":
        return inject_lora(model, spec, task, head_modules)
    if spec.method == "bottleneck":
        model.requires_grad_(False)
        inject_bottleneck(model, spec, model_type)
        for name in head_modules:
            model.get_submodule(name).requires_grad_(True)
        return model
    if spec.method == "prefix":
        return inject_prefix(model, spec, task)
    raise ValueError(f"unknown adapter method {spec.method!r}")
