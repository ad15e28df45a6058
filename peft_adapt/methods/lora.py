"""LoRA (Hu et al. 2021) through peft, everything about it in one place.

Training injects peft's LoRA (DoRA optional) into a (quantized) model. The runtime keeps every resident adapter
of a layer stacked, `A: [slots, r_max, in]` and `B: [slots, out, r_max]` (the scale folded into B; slot 0 and other
methods' slots all zeros): one row's delta is `B[slot] @ (A[slot] @ x)`, two plain matmuls when every row uses one
slot, else one gathered batched matmul pair (the BGMV idea of Punica and S-LoRA in plain PyTorch), whatever the
number of distinct adapters. Adapters combine exactly (factors concatenated), fold into base weights exactly
(`W + scale * B @ A`), and their weight deltas feed the merge methods (`merge/methods.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import UserInputError
from ..formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config
from ..models.structure import layer_features
from .base import (
    DELTA,
    PEFT_TASK_TYPES,
    AdapterWeights,
    PeftTrainedMethod,
    StackComponent,
    average_heads,
    gathered,
    head_modules,
    head_state,
)
from .lora_kernels import lora_delta_into, use_kernels
from .peft_state import read_peft_state

HEAD_MODULES = ("lm_head", "classifier", "score", "mlm_head")  # output layers: trained in full or frozen, never LoRA'd


class LoraSpec(BaseModel):
    """The `adapter:` section for `method: lora`."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["lora"] = "lora"
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
        if isinstance(module, (torch.nn.Linear, Conv1D)) and not set(name.split(".")) & set(HEAD_MODULES):
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


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The `out x in` weight delta of a LoRA pair A [r, in], B [out, r]."""
    return (b.double() @ a.double()).float() * scale


def to_lora(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors (A [rank, in], B [out, rank]) of a delta, and the relative error left."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = min(rank, s.shape[0])
    b = (u[:, :rank] * s[:rank]).float()
    a = vh[:rank].float()
    total = float(s.square().sum())
    lost = float(s[rank:].square().sum())
    return a.contiguous(), b.contiguous(), (lost / total) ** 0.5 if total > 0 else 0.0


class StackedLora(StackComponent):
    stage = DELTA
    method = "lora"

    def __init__(self, base_layer: nn.Module, capacity: int, dtype: torch.dtype, device):
        super().__init__()
        self.in_features, self.out_features = layer_features(base_layer)
        self.register_buffer("A", torch.zeros(capacity, 1, self.in_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("B", torch.zeros(capacity, self.out_features, 1, dtype=dtype, device=device), persistent=False)

    def _grow(self, capacity: int, rank: int) -> None:
        """More slots, or a larger padded rank, keeping what the stacks hold."""
        old_capacity, old_rank = self.A.shape[0], self.A.shape[1]
        if (capacity, rank) == (old_capacity, old_rank):
            return
        A = self.A.new_zeros(capacity, rank, self.in_features)
        B = self.B.new_zeros(capacity, self.out_features, rank)
        A[:old_capacity, :old_rank] = self.A
        B[:old_capacity, :, :old_rank] = self.B
        self.A, self.B = A, B

    def resize(self, capacity: int) -> None:
        self._grow(capacity, self.A.shape[1])

    @torch.no_grad()
    def write(self, slot: int, site) -> None:
        a, b, scale = site
        r = a.shape[0]
        self._grow(self.A.shape[0], max(r, self.A.shape[1]))
        self.clear(slot)
        self.A[slot, :r] = a.to(self.A.dtype)
        self.B[slot, :, :r] = (b.float() * scale).to(self.B.dtype)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()

    def apply(self, x: torch.Tensor, batch) -> torch.Tensor:
        r = batch.extent(self.method)
        xc = x.to(self.A.dtype)
        if batch.single is not None:
            return (xc @ self.A[batch.single, :r].T) @ self.B[batch.single, :, :r].T
        if x.shape[0] != batch.slots.shape[0]:
            raise RuntimeError(f"batch of {x.shape[0]} rows but {batch.slots.shape[0]} adapter slots")
        x3 = xc.reshape(x.shape[0], -1, self.in_features)
        if use_kernels(x):  # read each row's factors in place (Triton) instead of gathering copies of them
            delta = lora_delta_into(x3.new_zeros(*x3.shape[:2], self.out_features), x3, self.A, self.B, batch.slots, r)
        else:
            a, b = gathered(self.A[:, :r], batch), gathered(self.B[:, :, :r], batch)  # [batch, r, in], [batch, out, r]
            delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2))
        return delta.view(*x.shape[:-1], self.out_features)


class Lora(PeftTrainedMethod):
    name = "lora"
    tasks = (*PeftTrainedMethod.tasks, "seq2seq")
    spec = LoraSpec
    stackable = True
    delta_merges = True
    vllm_servable = True
    low_rank = True

    def inject(self, model, spec: LoraSpec, task: str, head_modules: list[str], model_type: str | None):
        """Wrap `model` with fresh LoRA weights; the task's head (if any) is trained in full and saved."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
            target_modules=resolve_target_modules(model, spec.target_modules), use_dora=spec.dora,
            modules_to_save=head_modules or None, task_type=PEFT_TASK_TYPES.get(task),
        )
        return get_peft_model(model, config)

    def read(self, folder: Path, strip_prefix: str = "") -> AdapterWeights:
        """A folder's LoRA as plain tensors per module (never through peft's loader: on AVX512-BF16 CPUs, peft
        loading onto a model that has served gives garbage; reading the safetensors ourselves is exact)."""
        config = read_adapter_config(folder)
        if config.dora:
            raise UserInputError(f"{folder}: a DoRA adapter; its magnitude vectors cannot be served from stacked LoRA "
                                 f"tensors. Serve it with peft, or retrain with adapter.dora: false")
        if config.data.get("rank_pattern") or config.data.get("alpha_pattern"):
            raise UserInputError(f"{folder}: rank_pattern / alpha_pattern adapters are not supported by the runtime yet")
        state, head = read_peft_state(folder, strip_prefix)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            path, _, which = key.rpartition(".lora_")
            if not path or which[:1] not in ("A", "B"):
                raise UserInputError(f"{folder}: weight {key!r} is neither a LoRA matrix nor a classification head")
            pairs.setdefault(path, {})[which[:1]] = tensor
        scale = config.lora_scale
        sites = {}
        for path, pair in pairs.items():
            if set(pair) != {"A", "B"}:
                raise UserInputError(f"{folder}: module {path} has lora_{''.join(pair)} without its partner")
            sites[path] = (pair["A"], pair["B"], scale)
        if not sites:
            raise UserInputError(f"{folder}: no LoRA weights in {ADAPTER_WEIGHTS}")
        return AdapterWeights(self.name, sites, head, extent=max(a.shape[0] for a, _, _ in sites.values()))

    def check_site(self, path: str, site, base_layer: nn.Module) -> None:
        a, b, _ = site
        features = layer_features(base_layer)
        if features is None:
            raise UserInputError(f"the adapter adapts {path!r}, a {type(base_layer).__name__}; only linear layers "
                                 f"(and GPT-2's Conv1D) are served")
        if (a.shape[1], b.shape[0]) != features:
            raise UserInputError(f"the adapter's {path} maps {a.shape[1]} -> {b.shape[0]} features, the base layer "
                                 f"{features[0]} -> {features[1]}")

    def component(self, site, base_layer: nn.Module, capacity: int, dtype, device) -> StackComponent:
        return StackedLora(base_layer, capacity, dtype, device)

    def combine(self, parts: list[tuple[AdapterWeights, float]]) -> AdapterWeights:
        """sum_i w_i * delta_i exactly, as one LoRA: A stacked along the rank, B scaled and concatenated."""
        head = average_heads([weights.head for weights, _ in parts], [w for _, w in parts])
        return _concatenated(parts, head)

    def stack(self, parts: list[AdapterWeights]) -> AdapterWeights:
        """Domain adapters under a task adapter: the sum of their deltas, with the top (task) adapter's head."""
        return _concatenated([(weights, 1.0) for weights in parts], parts[-1].head)

    # ---- deltas, for folding and for the merge methods

    def site_delta(self, site) -> torch.Tensor:
        return lora_delta(*site)

    def from_deltas(self, deltas: dict[str, torch.Tensor], rank: int, head: dict) -> tuple[AdapterWeights, dict]:
        """Merged deltas re-compressed to rank-`rank` factors by SVD, and what that lost per module."""
        sites, errors = {}, {}
        for path, delta in deltas.items():
            a, b, errors[path] = to_lora(delta, rank)
            sites[path] = (a, b, 1.0)
        return AdapterWeights(self.name, sites, head, extent=rank), errors

    def add_frozen(self, model: nn.Module, weights: AdapterWeights, prefix: str) -> None:
        """Each site's delta added to its base layer's output by a forward hook (peft's LoRA wraps the hooked layer,
        so a task adapter trained on top adds its own delta after this one)."""
        for path, (a, b, scale) in weights.sites.items():
            layer = model.get_submodule(prefix + path)
            layer = getattr(layer, "base_layer", layer)
            device = next(layer.parameters()).device
            layer.register_forward_hook(_adds_delta(a.float().to(device), (b.float() * scale).to(device)))

    def factors(self, site) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, scale = site
        return a.float(), b.float() * scale

    def fold(self, state: dict[str, torch.Tensor], path: str, site) -> None:
        weight = state[f"{path}.weight"]
        state[f"{path}.weight"] = weight + lora_delta(*site).to(weight.dtype)

    def write(self, weights: AdapterWeights, folder: Path, template: dict) -> None:
        """A peft-format LoRA folder with scale 1 (smaller factors padded with zeros to one rank: the same delta)."""
        from safetensors.torch import save_file

        rank = max(a.shape[0] for a, _, _ in weights.sites.values())
        state = {}
        for path, (a, b, scale) in weights.sites.items():
            pad = rank - a.shape[0]
            state[f"base_model.model.{path}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
            state[f"base_model.model.{path}.lora_B.weight"] = torch.cat([b * scale, b.new_zeros(b.shape[0], pad)], 1).contiguous()
        state |= head_state(weights.head, "base_model.model.")
        config = dict(template)
        config.update(r=rank, lora_alpha=rank, use_rslora=False, use_dora=False, rank_pattern={}, alpha_pattern={},
                      target_modules=sorted({p.split(".")[-1] for p in weights.sites}), lora_dropout=0.0,
                      modules_to_save=head_modules(weights.head) or None)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / ADAPTER_WEIGHTS))
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


    # ---- vLLM

    def vllm_folder(self, folder: Path, out: Path, pad_rank: bool) -> list[str]:
        """Write `folder`'s LoRA as vLLM loads it into `out`: a rank vLLM accepts (zero-padded on request: the same
        delta); returns what vLLM will not take, as warnings."""
        from safetensors.torch import load_file, save_file

        config = dict(read_adapter_config(folder).data)
        state = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
        warnings, rank = [], int(config["r"])
        if rank not in VLLM_RANKS:
            allowed = min(r for r in VLLM_RANKS if r >= rank) if rank <= VLLM_RANKS[-1] else None
            if pad_rank and allowed:
                # zero-padding A and B keeps B @ A; scaling alpha with r keeps alpha / r
                for key, t in list(state.items()):
                    if ".lora_A." in key:
                        state[key] = torch.cat([t, t.new_zeros(allowed - t.shape[0], t.shape[1])])
                    elif ".lora_B." in key:
                        state[key] = torch.cat([t, t.new_zeros(t.shape[0], allowed - t.shape[1])], 1)
                config["lora_alpha"] = float(config["lora_alpha"]) * allowed / rank
                config["r"] = allowed
            else:
                warnings.append(f"rank {rank} is not one vLLM accepts ({', '.join(map(str, VLLM_RANKS))}); "
                                f"export again with --pad-rank to pad it to {allowed} (the same delta)")
        if config.get("use_dora"):
            warnings.append("DoRA adapters are not supported by vLLM; retrain with adapter.dora: false")
        if config.get("modules_to_save"):
            warnings.append(f"modules_to_save {config['modules_to_save']} (a trained head) is not supported by vLLM; "
                            f"vLLM serves causal LM LoRA adapters without extra modules")
        if config.get("task_type") not in (None, "CAUSAL_LM"):
            warnings.append(f"task_type {config.get('task_type')}: vLLM serves causal LM adapters")
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / ADAPTER_WEIGHTS))
        (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        return warnings


def _concatenated(parts: list[tuple[AdapterWeights, float]], head: dict) -> AdapterWeights:
    """One LoRA whose delta is sum_i w_i * delta_i at every site any part adapts: A stacked along the rank, B scaled
    and concatenated."""
    modules: dict[str, tuple[list, list]] = {}
    for weights, w in parts:
        for path, (a, b, scale) in weights.sites.items():
            entry = modules.setdefault(path, ([], []))
            entry[0].append(a.float())
            entry[1].append(b.float() * (w * scale))
    sites = {path: (torch.cat(a_list), torch.cat(b_list, dim=1), 1.0) for path, (a_list, b_list) in modules.items()}
    return AdapterWeights("lora", sites, head, extent=max(a.shape[0] for a, _, _ in sites.values()))


VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORA = Lora()


def _adds_delta(a: torch.Tensor, b: torch.Tensor):
    def hook(module, args, output):
        x = args[0]
        return output + ((x.to(a.dtype) @ a.T) @ b.T).to(output.dtype)

    return hook
