"""Adapter methods behind one small interface: a spec (the recipe's `adapter:` section) and `inject`."""

from __future__ import annotations

from .lora import LoraSpec, inject_lora

AdapterSpec = LoraSpec  # becomes a union discriminated on `method` as methods are added


def inject_adapter(model, spec: AdapterSpec, task: str, head_modules: list[str]):
    """Return `model` wrapped with a fresh, trainable adapter of `spec.method`; the base stays frozen."""
    if spec.method == "lora":
        return inject_lora(model, spec, task, head_modules)
    raise ValueError(f"unknown adapter method {spec.method!r}")
