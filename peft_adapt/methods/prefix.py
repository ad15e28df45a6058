"""Prefix tuning through peft (Li & Liang 2021): learned key/value prefixes for every attention layer.

`num_virtual_tokens` prefixes; with `projection: true` they are produced by a small MLP from an
embedding during training (the reparameterisation of the paper), which peft folds away on save.
Works for causal LM and for our classification head (peft passes the prefixes as a cache).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PrefixSpec(BaseModel):
    """The `adapter:` section for `method: prefix`."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["prefix"]
    num_virtual_tokens: int = Field(16, ge=1)
    projection: bool = Field(False, description="train through a reparameterising MLP (folded on save)")
    projection_hidden_size: int = Field(128, ge=1)


def inject_prefix(model, spec: PrefixSpec, task: str):
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(
        task_type={"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS", "token_classification": "TOKEN_CLS"}[task],
        num_virtual_tokens=spec.num_virtual_tokens,
        prefix_projection=spec.projection,
        encoder_hidden_size=spec.projection_hidden_size,
    )
    return get_peft_model(model, config)
