"""Sequential bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), on quantized bases too; our own.

An adapter after a sublayer's output projection computes `h + up(act(down(h)))`. `houlsby` puts one
after the attention output and one after the feed-forward output of every layer; `pfeiffer` only after
the feed-forward output. `up` starts at zero, so a new adapter is the identity. The sites are found by
module role for the Llama, BERT and GPT-2 families, or named in the recipe (`modules:`).

On disk: `bottleneck_config.json` (our format: peft has no bottleneck adapters) and
`adapter_model.safetensors` with keys `<site>.adapter.{down,up}.{weight,bias}` (+ `classifier.*`).
In the runtime, every site keeps its resident adapters stacked (down [slots, size_max, hidden] and up
[slots, hidden, size_max], with biases; zeros for other slots, whose rows get `up(act(0)) + 0 = 0` added):
one gathered bmm pair per batch. Adapters of one shape average linearly; they add layers, so they never fold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import UserInputError
from ..formats import read_adapter_config
from ..models.structure import block_roles
from .base import (
    OUTPUT,
    AdapterMethod,
    AdapterWeights,
    StackComponent,
    gathered,
    head_name,
    head_state,
    weighted_average,
)

CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ACTIVATIONS = {"relu": nn.functional.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}

# module roles per model family: (attention output projection, feed-forward output projection)
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
    roles = block_roles(model)  # after each block's attention and feed-forward output projections
    if roles is None:
        raise UserInputError(f"cannot tell the attention and feed-forward sublayers of this {model_type} model's "
                             f"blocks; name the sublayer output projections in adapter.modules")
    chosen = set(roles.ffn_outputs) | (set() if spec.variant == "pfeiffer" else set(roles.attention_outputs))
    return [n for n in names if n in chosen]


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
    config = read_adapter_config(folder).data
    if config.get("method") != "bottleneck" or not isinstance(config.get("sites"), dict):
        raise UserInputError(f"{Path(folder) / CONFIG_FILE}: not a bottleneck adapter config (method and sites are required)")
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


class StackedBottleneck(StackComponent):
    """A sublayer's output followed by every resident bottleneck adapter, stacked."""

    stage = OUTPUT
    method = "bottleneck"

    def __init__(self, hidden: int, capacity: int, dtype: torch.dtype, device):
        super().__init__()
        self.hidden = hidden
        self.activations = ["relu"] * capacity
        z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.register_buffer("down", z(capacity, 1, hidden), persistent=False)
        self.register_buffer("down_bias", z(capacity, 1), persistent=False)
        self.register_buffer("up", z(capacity, hidden, 1), persistent=False)
        self.register_buffer("up_bias", z(capacity, hidden), persistent=False)

    def _grow(self, capacity: int, size: int) -> None:
        old_capacity, old_size = self.down.shape[0], self.down.shape[1]
        if (capacity, size) == (old_capacity, old_size):
            return
        down, up = self.down.new_zeros(capacity, size, self.hidden), self.up.new_zeros(capacity, self.hidden, size)
        down_bias, up_bias = self.down_bias.new_zeros(capacity, size), self.up_bias.new_zeros(capacity, self.hidden)
        down[:old_capacity, :old_size] = self.down
        up[:old_capacity, :, :old_size] = self.up
        down_bias[:old_capacity, :old_size] = self.down_bias
        up_bias[:old_capacity] = self.up_bias
        self.down, self.up, self.down_bias, self.up_bias = down, up, down_bias, up_bias
        self.activations += ["relu"] * (capacity - len(self.activations))

    def resize(self, capacity: int) -> None:
        self._grow(capacity, self.down.shape[1])

    @torch.no_grad()
    def write(self, slot: int, site) -> None:
        down, down_bias, up, up_bias, activation = site
        size = down.shape[0]
        self._grow(self.down.shape[0], max(size, self.down.shape[1]))
        self.clear(slot)
        self.down[slot, :size] = down.to(self.down.dtype)
        self.down_bias[slot, :size] = down_bias.to(self.down.dtype)
        self.up[slot, :, :size] = up.to(self.up.dtype)
        self.up_bias[slot] = up_bias.to(self.up.dtype)
        self.activations[slot] = activation

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        for t in (self.down, self.down_bias, self.up, self.up_bias):
            t[slot].zero_()

    def _act(self, h: torch.Tensor, slots: list[int]) -> torch.Tensor:
        kinds = {self.activations[s] for s in slots}
        if len(kinds) == 1:
            return ACTIVATIONS[kinds.pop()](h)
        out = torch.zeros_like(h)  # rows of different activations: each row through its own
        for kind in kinds:
            rows = torch.tensor([self.activations[s] == kind for s in slots], device=h.device)
            out[rows] = ACTIVATIONS[kind](h[rows])
        return out

    def apply(self, y: torch.Tensor, batch) -> torch.Tensor:
        b = batch.extent(self.method)
        yc = y.to(self.down.dtype)
        slots = [batch.single] if batch.single is not None else list(batch.slot_list)
        y3 = yc.reshape(y.shape[0], -1, self.hidden)
        down, down_bias = gathered(self.down[:, :b], batch), gathered(self.down_bias[:, :b], batch)
        h = self._act(torch.matmul(y3, down.transpose(1, 2)) + down_bias.unsqueeze(1), slots)
        delta = torch.matmul(h, gathered(self.up[:, :, :b], batch).transpose(1, 2))
        delta = delta + gathered(self.up_bias, batch).unsqueeze(1)
        return y + delta.view(y.shape).to(y.dtype)


class Bottleneck(AdapterMethod):
    name = "bottleneck"
    spec = BottleneckSpec
    fold_reason = ("a bottleneck adapter adds new layers (down-projection, nonlinearity, up-projection) between the "
                   "base's layers; no change of the existing weights computes the same function")

    def inject(self, model, spec: BottleneckSpec, task: str, head_modules: list[str], model_type: str | None):
        model.requires_grad_(False)
        inject_bottleneck(model, spec, model_type)
        for name in head_modules:
            model.get_submodule(name).requires_grad_(True)
        return model

    def save(self, model, folder: Path) -> None:
        save_bottleneck(model, folder)

    def load_for_eval(self, model, folder: Path):
        return load_bottleneck(model, folder, model.config.model_type)

    def read(self, folder: Path, strip_prefix: str = "") -> AdapterWeights:
        from safetensors.torch import load_file

        config = read_bottleneck_config(folder)
        state = load_file(str(Path(folder) / WEIGHTS_FILE))
        sites = {}
        for path in config["sites"]:
            try:
                parts = tuple(state[f"{path}.adapter.{k}"] for k in ("down.weight", "down.bias", "up.weight", "up.bias"))
            except KeyError as exc:
                raise UserInputError(f"{folder}: {WEIGHTS_FILE} lacks {exc.args[0]}") from None
            key = path[len(strip_prefix):] if strip_prefix and path.startswith(strip_prefix) else path
            sites[key] = (*parts, config["activation"])
        head = {head_name(k): v for k, v in state.items() if head_name(k)}
        return AdapterWeights(self.name, sites, head, extent=max(s[0].shape[0] for s in sites.values()),
                              config={k: v for k, v in config.items() if k != "sites"})

    def check_site(self, path: str, site, base_layer: nn.Module) -> None:
        hidden = output_features(base_layer)
        if site[0].shape[1] != hidden:
            raise UserInputError(f"the adapter's site {path} has hidden size {site[0].shape[1]}, the base {hidden}")

    def component(self, site, base_layer: nn.Module, capacity: int, dtype, device) -> StackComponent:
        return StackedBottleneck(output_features(base_layer), capacity, dtype, device)

    def combine(self, parts: list[tuple[AdapterWeights, float]]) -> AdapterWeights:
        return weighted_average(parts, "bottleneck")

    def write(self, weights: AdapterWeights, folder: Path, template: dict) -> None:
        from safetensors.torch import save_file

        state = {}
        for path, (down, down_bias, up, up_bias, _) in weights.sites.items():
            for key, tensor in (("down.weight", down), ("down.bias", down_bias), ("up.weight", up), ("up.bias", up_bias)):
                state[f"{path}.adapter.{key}"] = tensor.float().contiguous()
        state |= head_state({k: v.float() for k, v in weights.head.items()})
        config = dict(template) | {"sites": {p: [s[0].shape[1], s[0].shape[0]] for p, s in weights.sites.items()}}
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


BOTTLENECK = Bottleneck()
