"""Adapter methods: one module each, and this one table that every other layer asks (see `base.py`).

- `lora.py`: LoRA / DoRA through peft; stacked in the runtime, folds into base weights, feeds the merge methods.
- `bottleneck.py`: sequential bottleneck adapters (Houlsby, Pfeiffer), our own: peft has none.
- `prefix.py`: prefix tuning through peft; served per group.
- `ia3.py`: (IA)3 through peft: learned rescaling vectors; stacked in the runtime, folds into base weights.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Discriminator, Tag

from ..errors import UserInputError
from ..formats import read_adapter_config
from .base import AdapterMethod, AdapterWeights, StackComponent  # noqa: F401 (the protocol, for callers)
from .bottleneck import BOTTLENECK
from .ia3 import IA3_METHOD
from .lora import LORA
from .prefix import PREFIX

TABLE: dict[str, AdapterMethod] = {m.name: m for m in (LORA, BOTTLENECK, PREFIX, IA3_METHOD)}
DEFAULT = LORA.name  # a recipe's `adapter:` without `method:`
SPECS = {name: method.spec for name, method in TABLE.items()}
METHODS = tuple(TABLE)


def method(name: str) -> AdapterMethod:
    if name not in TABLE:
        raise UserInputError(f"adapter method {name!r} is not known; the methods are {', '.join(METHODS)}")
    return TABLE[name]


def method_of_folder(folder) -> AdapterMethod:
    """The method an adapter folder's config names."""
    return method(read_adapter_config(folder).method)


def _method_of(value) -> str:
    """The union's tag: `method:` if given (the default method when absent)."""
    if isinstance(value, dict):
        return value.get("method", DEFAULT)
    return getattr(value, "method", DEFAULT)


AdapterSpec = Annotated[
    Union[tuple(Annotated[spec, Tag(name)] for name, spec in SPECS.items())],  # noqa: UP007
    Discriminator(_method_of),
]


def inject_adapter(model, spec, task: str, head_modules: list[str], model_type: str | None = None):
    """Return `model` with a fresh, trainable adapter of `spec.method`; the base stays frozen."""
    return method(spec.method).inject(model, spec, task, head_modules, model_type)
