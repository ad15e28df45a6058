"""(IA)3 (Liu et al. 2022, "Few-shot parameter-efficient fine-tuning is better and cheaper than in-context learning")
through peft: learned vectors that rescale activations.

A target layer's output is scaled elementwise (`y * l`, keys and values by default) or, for a feed-forward layer,
its input (`W (x * l)`). The vectors start at ones, so a new adapter is the identity. In the runtime every site keeps
its resident adapters' vectors stacked, `[slots, features]`, ones in every slot that is not (IA)3 (slot 0
included): one gathered elementwise multiply per site, whatever the mix of adapters in the batch. Rescaling a
layer's outputs or inputs is rescaling the rows or columns of its weight (and its bias), so (IA)3 folds into base
weights exactly; adapters of one shape combine by averaging their vectors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import UserInputError
from ..formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..models.structure import block_roles, layer_features
from .base import (
    INPUT,
    OUTPUT,
    PEFT_TASK_TYPES,
    AdapterWeights,
    PeftTrainedMethod,
    StackComponent,
    gathered,
    head_state,
    weighted_average,
)
from .peft_state import read_peft_state

VECTOR = "ia3_l"


class IA3Spec(BaseModel):
    """The `adapter:` section for `method: ia3`."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["ia3"]
    target_modules: Literal["auto"] | list[str] = Field(
        "auto", description="layers whose activations are rescaled; auto: peft's choice for the family (keys, values, "
                            "feed-forward)")
    feedforward_modules: Literal["auto"] | list[str] = Field(
        "auto", description="those of them whose inputs (not outputs) are rescaled")


class StackedIA3(StackComponent):
    """One site's (IA)3 vectors over slots; ones where a slot holds no (IA)3 adapter."""

    method = "ia3"

    def __init__(self, stage: str, features: int, capacity: int, dtype: torch.dtype, device):
        super().__init__()
        self.stage = stage
        self.register_buffer("scales", torch.ones(capacity, features, dtype=dtype, device=device), persistent=False)

    def resize(self, capacity: int) -> None:
        old = self.scales.shape[0]
        if capacity != old:
            grown = self.scales.new_ones(capacity, self.scales.shape[1])
            grown[:old] = self.scales
            self.scales = grown

    @torch.no_grad()
    def write(self, slot: int, site) -> None:
        vector, stage = site
        if stage != self.stage:
            raise UserInputError(f"an (IA)3 adapter that scales this layer's {stage}s cannot share it with one that "
                                 f"scales its {self.stage}s (feedforward_modules differ)")
        self.scales[slot] = vector.to(self.scales.dtype)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        self.scales[slot] = 1

    def apply(self, tensor: torch.Tensor, batch) -> torch.Tensor:
        scales = gathered(self.scales, batch)  # [rows or 1, features]
        shape = (scales.shape[0],) + (1,) * (tensor.dim() - 2) + (scales.shape[1],)
        return (tensor.to(scales.dtype) * scales.view(shape)).to(tensor.dtype)


def _stage(vector_shape: list[int] | tuple[int, ...]) -> str:
    """peft saves an output scaling as [out, 1] and a feed-forward (input) scaling as [1, in]."""
    return INPUT if vector_shape[0] == 1 and len(vector_shape) == 2 and vector_shape[1] != 1 else OUTPUT


class IA3(PeftTrainedMethod):
    name = "ia3"
    tasks = (*PeftTrainedMethod.tasks, "seq2seq")
    spec = IA3Spec

    def inject(self, model, spec: IA3Spec, task: str, head_modules: list[str], model_type: str | None):
        from peft import IA3Config, get_peft_model
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        )
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
        )

        targets = TARGETS.get(model_type) if spec.target_modules == "auto" else spec.target_modules
        feedforward = FEEDFORWARD.get(model_type) if spec.feedforward_modules == "auto" else spec.feedforward_modules
        if targets is None or feedforward is None:  # a family peft has no list for: read the blocks' structure
            roles = block_roles(model)
            if roles is None:
                raise UserInputError(f"adapter.target_modules: cannot tell the attention and feed-forward layers of "
                                     f"this {model_type} model; name them (target_modules and feedforward_modules)")
            # attention's input projections and the feed-forward output (its input scaled), as (IA)3 chose them
            targets = targets or roles.attention_inputs + roles.ffn_outputs
            feedforward = feedforward or roles.ffn_outputs
        config = IA3Config(target_modules=targets, feedforward_modules=[f for f in feedforward if f in targets],
                           modules_to_save=head_modules or None,
                           task_type=PEFT_TASK_TYPES.get(task))
        return get_peft_model(model, config)

    def read(self, folder: Path, strip_prefix: str = "") -> AdapterWeights:
        state, head = read_peft_state(folder, strip_prefix)
        sites = {}
        for key, tensor in state.items():
            path, _, name = key.rpartition(".")
            if name != VECTOR:
                raise UserInputError(f"{folder}: weight {key!r} is neither an (IA)3 vector nor a classification head")
            sites[path] = (tensor.reshape(-1), _stage(tuple(tensor.shape)))
        if not sites:
            raise UserInputError(f"{folder}: no (IA)3 vectors in {ADAPTER_WEIGHTS}")
        return AdapterWeights(self.name, sites, head, extent=1)

    def check_site(self, path: str, site, base_layer: nn.Module) -> None:
        vector, stage = site
        features = layer_features(base_layer)
        if features is None:
            raise UserInputError(f"the adapter scales {path!r}, a {type(base_layer).__name__}; only linear layers "
                                 f"(and GPT-2's Conv1D) are served")
        features = features[0] if stage == INPUT else features[1]
        if vector.shape[0] != features:
            raise UserInputError(f"the adapter scales {vector.shape[0]} {stage}s of {path}, which has {features}")

    def component(self, site, base_layer: nn.Module, capacity: int, dtype, device) -> StackComponent:
        vector, stage = site
        return StackedIA3(stage, vector.shape[0], capacity, dtype, device)

    def combine(self, parts: list[tuple[AdapterWeights, float]]) -> AdapterWeights:
        return weighted_average(parts, "(IA)3")

    def fold(self, state: dict[str, torch.Tensor], path: str, site) -> None:
        vector, stage = site
        weight = state[f"{path}.weight"]
        if stage == INPUT:  # W (x * l) = (W diag(l)) x: the columns
            state[f"{path}.weight"] = weight * vector.to(weight.dtype)[None, :]
        else:  # (W x + b) * l: the rows, and the bias
            state[f"{path}.weight"] = weight * vector.to(weight.dtype)[:, None]
            if f"{path}.bias" in state:
                state[f"{path}.bias"] = state[f"{path}.bias"] * vector.to(weight.dtype)

    def write(self, weights: AdapterWeights, folder: Path, template: dict) -> None:
        from safetensors.torch import save_file

        state = {}
        for path, (vector, stage) in weights.sites.items():
            shaped = vector.reshape(1, -1) if stage == INPUT else vector.reshape(-1, 1)
            state[f"base_model.model.{path}.{VECTOR}"] = shaped.float().contiguous()
        state |= head_state(weights.head, "base_model.model.")
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / ADAPTER_WEIGHTS))
        (folder / ADAPTER_CONFIG).write_text(json.dumps(dict(template), indent=2))


IA3_METHOD = IA3()
