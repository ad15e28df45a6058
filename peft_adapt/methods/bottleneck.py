"""Sequential bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), on quantized bases too.

An adapter after a sublayer's output projection computes `h + up(act(down(h)))`. `houlsby` puts one
after the attention output and one after the feed-forward output of every layer; `pfeiffer` only after
the feed-forward output. `up` starts at zero, so a new adapter is the identity. The sites are found by
module role for the Llama, BERT and GPT-2 families, or named in the recipe (`modules:`).

On disk: `bottleneck_config.json` (our format: peft has no bottleneck adapters) and
`adapter_model.safetensors` with keys `<site>.adapter.{down,up}.{weight,bias}` (+ `classifier.*`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import UserInputError

CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ACTIVATIONS = {"relu": nn.functional.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}

# module roles per model family: (attention output projection, feed-forward output projection)
ROLES = {
    "llama": (r"\.self_attn\.o_proj$", r"\.mlp\.down_proj$"),
    "mistral": (r"\.self_attn\.o_proj$", r"\.mlp\.down_proj$"),
    "qwen2": (r"\.self_attn\.o_proj$", r"\.mlp\.down_proj$"),
    "bert": (r"\.attention\.output\.dense$", r"\.layer\.\d+\.output\.dense$"),
    "roberta": (r"\.attention\.output\.dense$", r"\.layer\.\d+\.output\.dense$"),
    "gpt2": (r"\.attn\.c_proj$", r"\.mlp\.c_proj$"),
}


class BottleneckSpec(BaseModel):
    """The `adapter:` section for `method: bottleneck`."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["bottleneck"]
    variant: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    bottleneck_size: int | None = Field(None, ge=1, description="instead of hidden size / reduction_factor")
    reduction_factor: int = Field(16, ge=1)
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    modules: list[str] | None = Field(None, description="explicit sites (full names or suffixes), for other families")


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden: int, size: int, activation: str, device=None):
        super().__init__()
        self.down = nn.Linear(hidden, size, device=device, dtype=torch.float32)
        self.up = nn.Linear(size, hidden, device=device, dtype=torch.float32)
        nn.init.zeros_(self.up.weight)  # the identity at the start
        nn.init.zeros_(self.up.bias)
        self.activation = activation

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.down.weight.dtype)
        return h + self.up(ACTIVATIONS[self.activation](self.down(x))).to(h.dtype)


class BottleneckSite(nn.Module):
    """A base layer followed by its bottleneck adapter."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.base_layer(*args, **kwargs))


def output_features(module: nn.Module) -> int:
    if hasattr(module, "out_features"):
        return module.out_features
    if hasattr(module, "nf"):  # GPT-2 Conv1D
        return module.nf
    raise UserInputError(f"cannot tell the output size of a {type(module).__name__}; name linear layers in adapter.modules")


def find_sites(model: nn.Module, spec: BottleneckSpec, model_type: str | None) -> list[str]:
    """Module paths after which adapters go."""
    names = [n for n, _ in model.named_modules() if n]
    if spec.modules:
        sites = [n for n in names if any(n == m or n.endswith("." + m) for m in spec.modules)]
        missing = [m for m in spec.modules if not any(n == m or n.endswith("." + m) for n in names)]
        if missing:
            raise UserInputError(f"adapter.modules: {missing} name no module of this model")
        return sites
    if model_type not in ROLES:
        raise UserInputError(
            f"bottleneck adapters know the module roles of {', '.join(sorted(ROLES))} models, not {model_type!r}; "
            f"name the sublayer output projections in adapter.modules"
        )
    attention, ffn = ROLES[model_type]
    patterns = [ffn] if spec.variant == "pfeiffer" else [attention, ffn]
    sites = [n for n in names if any(re.search(p, n) for p in patterns)]
    if not sites:
        raise UserInputError(f"no {spec.variant} adapter site found in this {model_type} model")
    return sites


def inject_bottleneck(model: nn.Module, spec: BottleneckSpec, model_type: str | None,
                      sizes_by_site: dict[str, int] | None = None) -> nn.Module:
    """Put a fresh adapter after every site (in place); only the adapters (and any head) train."""
    sites = find_sites(model, spec, model_type)
    sizes = {}
    for path in sites:
        base = model.get_submodule(path)
        hidden = output_features(base)
        size = (sizes_by_site or {}).get(path) or spec.bottleneck_size or max(1, hidden // spec.reduction_factor)
        device = next(base.parameters()).device
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, BottleneckSite(base, BottleneckAdapter(hidden, size, spec.activation, device)))
        sizes[path] = [hidden, size]
    model.bottleneck_config = {"method": "bottleneck", **spec.model_dump(exclude={"method"}), "sites": sizes}
    # Trainer refuses a quantized model without attached adapters; these are attached adapters
    model._hf_peft_config_loaded = True
    return model


def bottleneck_state(model: nn.Module, heads: tuple[str, ...] = ("classifier",)) -> dict[str, torch.Tensor]:
    """The adapter (and head) weights, keyed by module path."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if ".adapter." in n or n.split(".")[0] in heads}


def save_bottleneck(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(bottleneck_state(model), str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(model.bottleneck_config, indent=2))


def read_bottleneck_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: corrupt JSON ({exc.msg} at line {exc.lineno})") from None
    if config.get("method") != "bottleneck" or not isinstance(config.get("sites"), dict):
        raise UserInputError(f"{path}: not a bottleneck adapter config (method and sites are required)")
    return config


def load_bottleneck(model: nn.Module, folder: Path, model_type: str | None) -> nn.Module:
    """Inject the adapters a saved folder describes and load their weights (strictly)."""
    from safetensors.torch import load_file

    config = read_bottleneck_config(folder)
    spec = BottleneckSpec(method="bottleneck", **{k: v for k, v in config.items() if k in BottleneckSpec.model_fields and k != "method"})
    spec = spec.model_copy(update={"modules": list(config["sites"])})
    inject_bottleneck(model, spec, model_type, {path: size for path, (_, size) in config["sites"].items()})
    state = load_file(str(Path(folder) / WEIGHTS_FILE))
    own = dict(model.named_parameters())
    unknown = [k for k in state if k not in own]
    if unknown:
        raise UserInputError(f"{folder}: weights {unknown[:3]} fit no adapter of this base")
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor.to(own[key].dtype))
    return model
