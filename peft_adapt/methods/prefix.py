"""Prefix tuning (Li & Liang 2021) through peft: learned key/value prefixes for every attention layer.

`num_virtual_tokens` prefixes; with `projection: true` they are produced by a small MLP from an embedding
during training (the reparameterisation of the paper), which peft folds away on save. Works for causal LM and
for our classification head (peft passes the prefixes as a cache). Prefixes cannot be stacked with other rows'
adapters in one forward: the runtime runs each prefix adapter's rows as a group, through a peft wrapper around
the shared base whose prefix embedding is copied in by us (not peft's loader, which is the trap after the base has
served on AVX512-BF16 CPUs). Adapters of one shape average linearly; prefixes add attention inputs, so they never fold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import UserInputError
from ..formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config
from .base import AdapterWeights, PeftTrainedMethod, head_state, weighted_average
from .peft_state import read_peft_state

PROMPT = "prompt_embeddings"


class PrefixSpec(BaseModel):
    """The `adapter:` section for `method: prefix`."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["prefix"]
    num_virtual_tokens: int = Field(16, ge=1)
    projection: bool = Field(False, description="train through a reparameterising MLP (folded on save)")
    projection_hidden_size: int = Field(128, ge=1)


TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS", "token_classification": "TOKEN_CLS"}


class Prefix(PeftTrainedMethod):
    name = "prefix"
    spec = PrefixSpec
    stacked = False
    tasks = tuple(TASK_TYPES)  # peft has no prefix tuning for our masked-LM head
    fold_reason = ("prefix tuning adds learned key/value vectors to every attention layer's input, which no change of "
                   "the base's weights reproduces")

    def inject(self, model, spec: PrefixSpec, task: str, head_modules: list[str], model_type: str | None):
        from peft import PrefixTuningConfig, get_peft_model

        config = PrefixTuningConfig(task_type=TASK_TYPES[task], num_virtual_tokens=spec.num_virtual_tokens,
                                    prefix_projection=spec.projection, encoder_hidden_size=spec.projection_hidden_size)
        return get_peft_model(model, config)

    def peft_loadable(self, task: str) -> bool:
        return task == "causal_lm"  # our classifier heads take the prefixes through peft's SEQ_CLS wrapper only

    def read(self, folder: Path, strip_prefix: str = "") -> AdapterWeights:
        config = read_adapter_config(folder).data
        state, head = read_peft_state(folder, strip_prefix)
        if set(state) != {PROMPT}:
            raise UserInputError(f"{folder}: a prefix adapter holds {PROMPT} only, found {sorted(state)[:3]}")
        return AdapterWeights(self.name, {PROMPT: state[PROMPT]}, head, extent=0, config=config)

    def group_model(self, weights: AdapterWeights, model):
        """A peft wrapper around the shared base with this adapter's prefixes copied in: a causal LM's, or for a
        classifier the bare encoder's (peft's feature extraction; the runtime applies the adapter's head)."""
        from peft import PeftModelForCausalLM, PeftModelForFeatureExtraction
        from peft.mapping import get_peft_config

        task_type = weights.config.get("task_type")
        if task_type not in ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS"):
            raise UserInputError(f"a prefix adapter of task_type {task_type!r} cannot be served; the runtime serves "
                                 f"CAUSAL_LM, SEQ_CLS and TOKEN_CLS ones")
        served = {"inference_mode": True} | ({} if task_type == "CAUSAL_LM" else {"task_type": "FEATURE_EXTRACTION"})
        config = get_peft_config(dict(weights.config) | served)  # the folded prefixes, no MLP
        wrapped = (PeftModelForCausalLM if task_type == "CAUSAL_LM" else PeftModelForFeatureExtraction)(model, config)
        embedding = wrapped.prompt_encoder["default"].embedding
        with torch.no_grad():
            embedding.weight.copy_(weights.sites[PROMPT].to(embedding.weight.dtype))
        return wrapped.eval()

    def combine(self, parts: list[tuple[AdapterWeights, float]]) -> AdapterWeights:
        return weighted_average(parts, "prefix")

    def write(self, weights: AdapterWeights, folder: Path, template: dict) -> None:
        from safetensors.torch import save_file

        state = {PROMPT: weights.sites[PROMPT].contiguous()}
        state |= head_state(weights.head, "base_model.model.")
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / ADAPTER_WEIGHTS))
        (folder / ADAPTER_CONFIG).write_text(json.dumps(dict(template), indent=2))


PREFIX = Prefix()
