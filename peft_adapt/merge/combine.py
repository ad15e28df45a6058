"""Combine several LoRA adapters of one base into a new registered adapter.

Load the parents from the registry, compute every adapted module's merged delta with a method of
`methods.py` (or concatenate the factors for `cat`), re-compress it to LoRA factors by SVD, write a
peft-format folder whose manifest records the parents, weights and method, and register it.
Methods:
- `cat`: the factors concatenated along the rank: exactly sum_i w_i delta_i, rank = sum of ranks;
- `svd`: sum_i w_i delta_i truncated by SVD to `rank` (default: the largest parent rank);
- `linear`, `magnitude_prune`, `ties`, `dare_linear`, `dare_ties`: see `methods.py`; the merged delta is
  re-compressed to `rank` (default: the sum of the parents' ranks, so `linear` loses nothing).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..adapter_files import read_adapter_config
from ..errors import UserInputError
from ..manifest import build_manifest, write_json
from ..runtime.lora_weights import LoraWeights, average_heads, read_lora_weights
from .lowrank import lora_delta, to_lora
from .methods import DELTA_METHODS

METHODS = ("cat", "svd", *DELTA_METHODS)
PER_ENTRY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def merge_lora(parents: list[LoraWeights], weights: list[float], method: str, density: float = 1.0,
               seed: int = 0, rank: int | None = None) -> tuple[dict, dict]:
    """Merged LoRA modules {path: (A, B, 1.0)} and a report of what re-compression lost."""
    if method not in METHODS:
        raise UserInputError(f"merge method {method!r} is not known; use one of {', '.join(METHODS)}")
    if len(parents) != len(weights):
        raise UserInputError(f"{len(weights)} weights for {len(parents)} adapters; give one weight per adapter")
    if not 0 < density <= 1:
        raise UserInputError(f"density must be in (0, 1], got {density}")
    if method in PER_ENTRY_METHODS and len(parents) < 1:
        raise UserInputError(f"{method} needs at least one adapter")
    paths = sorted(set().union(*(p.modules for p in parents)))
    merged, errors = {}, {}
    if method == "cat":
        for path in paths:
            a_parts, b_parts = [], []
            for parent, w in zip(parents, weights):
                if path in parent.modules:
                    a, b, scale = parent.modules[path]
                    a_parts.append(a.float())
                    b_parts.append(b.float() * (w * scale))
            merged[path] = (torch.cat(a_parts), torch.cat(b_parts, dim=1), 1.0)
        return merged, {"relative_error_max": 0.0, "rank": max(a.shape[0] for a, _, _ in merged.values())}
    generator = torch.Generator().manual_seed(seed)
    default_rank = max(p.rank for p in parents) if method == "svd" else sum(p.rank for p in parents)
    target = rank or default_rank
    delta_fn = DELTA_METHODS["linear" if method == "svd" else method]
    for path in paths:
        deltas = []
        for parent in parents:
            if path in parent.modules:
                deltas.append(lora_delta(*parent.modules[path]))
            else:
                a, b, _ = next(p.modules[path] for p in parents if path in p.modules)
                deltas.append(torch.zeros(b.shape[0], a.shape[1]))
        delta = delta_fn(deltas, weights, density, generator)
        a, b, error = to_lora(delta, target)
        merged[path] = (a, b, 1.0)
        errors[path] = error
    return merged, {"relative_error_max": max(errors.values()), "relative_error_mean": sum(errors.values()) / len(errors),
                    "rank": target}


def _merged_head(parents: list[LoraWeights], weights: list[float], labels: list) -> dict:
    if any(lab != labels[0] for lab in labels):
        raise UserInputError("classification adapters can be combined only when all have the same label map")
    return average_heads([p.head for p in parents], weights)


def average_adapter_files(folders: list[Path], weights: list[float], out: Path) -> dict:
    """Bottleneck or prefix adapters of one shape: every tensor the weighted sum of the parents'."""
    from safetensors.torch import load_file, save_file

    configs = [sorted(p.name for p in f.glob("*_config.json")) for f in folders]
    config_name = configs[0][0]
    shapes = []
    states = [load_file(str(f / "adapter_model.safetensors")) for f in folders]
    for folder, state in zip(folders, states):
        shapes.append({k: tuple(v.shape) for k, v in state.items()})
        if shapes[-1] != shapes[0]:
            raise UserInputError(f"{folder} has other sites or sizes than {folders[0]}; only adapters of one shape can be averaged")
    merged = {k: sum(state[k].float() * w for state, w in zip(states, weights)).contiguous() for k in states[0]}
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "adapter_model.safetensors"))
    shutil.copy2(folders[0] / config_name, out / config_name)
    return {"relative_error_max": 0.0}


def write_lora_folder(folder: Path, modules: dict, head: dict, template: dict) -> None:
    """A peft-format LoRA folder (adapter_config.json + adapter_model.safetensors) with scale 1."""
    from safetensors.torch import save_file

    rank = max(a.shape[0] for a, _, _ in modules.values())
    state = {}
    for path, (a, b, scale) in modules.items():
        pad = rank - a.shape[0]  # one rank for the folder: pad smaller factors with zeros (same delta)
        state[f"base_model.model.{path}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        state[f"base_model.model.{path}.lora_B.weight"] = torch.cat([b * scale, b.new_zeros(b.shape[0], pad)], 1).contiguous()
    for key, tensor in head.items():
        state[f"base_model.model.classifier.{key}"] = tensor.contiguous()
    config = dict(template)
    config.update(r=rank, lora_alpha=rank, use_rslora=False, use_dora=False, rank_pattern={}, alpha_pattern={},
                  target_modules=sorted({p.split(".")[-1] for p in modules}), lora_dropout=0.0,
                  modules_to_save=["classifier"] if head else None)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def combine_adapters(registry, refs: list[str], method: str, name: str, weights: list[float] | None = None,
                     density: float = 1.0, seed: int = 0, rank: int | None = None, domain: str | None = None):
    """Merge registry adapters `refs` into a new adapter registered as `name`; returns its entry."""
    from ..registry import check_name

    check_name(name)
    if len(refs) < 1:
        raise UserInputError("merge needs at least one adapter")
    weights = list(weights) if weights is not None else [1.0 / len(refs)] * len(refs)
    entries = [registry.get(ref) for ref in refs]
    manifests = [e.manifest for e in entries]
    for e, m in zip(entries, manifests):
        if m.get("method") not in ("lora", "bottleneck", "prefix"):
            raise UserInputError(f"{e.ref} is a {m.get('method')} model, not an adapter; merging combines adapters")
        if m.get("method") != manifests[0].get("method"):
            raise UserInputError(f"{e.ref} is a {m.get('method')} adapter and {entries[0].ref} a {manifests[0].get('method')} one; "
                                 f"only adapters of one method can be merged")
        if m["base_fingerprint"]["id"] != manifests[0]["base_fingerprint"]["id"]:
            raise UserInputError(
                f"{e.ref} was trained on base {m.get('base_model')!r} ({m['base_fingerprint']['id']}) and "
                f"{entries[0].ref} on {manifests[0].get('base_model')!r} ({manifests[0]['base_fingerprint']['id']}); "
                f"only adapters of one base can be merged"
            )
        if m.get("task") != manifests[0].get("task"):
            raise UserInputError(f"{e.ref} is a {m.get('task')} adapter and {entries[0].ref} a {manifests[0].get('task')} one")
    staging = Path(tempfile.mkdtemp(prefix="merge-"))
    try:
        if manifests[0].get("method") == "lora":
            parents = [read_lora_weights(e.path) for e in entries]
            modules, report = merge_lora(parents, weights, method, density, seed, rank)
            head = _merged_head(parents, weights, [m.get("labels") for m in manifests])
            write_lora_folder(staging, modules, head, read_adapter_config(entries[0].path))
        else:
            if method != "linear":
                raise UserInputError(f"{manifests[0].get('method')} adapters combine by linear averaging only (--method linear)")
            if any(m.get("labels") != manifests[0].get("labels") for m in manifests):
                raise UserInputError("classification adapters can be combined only when all have the same label map")
            report = average_adapter_files([e.path for e in entries], weights, staging)
        first = manifests[0]
        manifest = build_manifest(
            folder=staging, name=name, domain=domain or "+".join(m.get("domain") or "?" for m in manifests),
            method=first.get("method"), task=first.get("task"), base_model=first.get("base_model"),
            base_fingerprint=first["base_fingerprint"], quantization=first.get("quantization"),
            recipe=first.get("recipe"), data_sha256={e.ref: m.get("data_sha256") for e, m in zip(entries, manifests)},
            metrics={}, labels=first.get("labels"),
        )
        manifest["pooling"] = first.get("pooling")
        manifest["merge"] = {"method": method, "parents": [e.ref for e in entries], "weights": weights,
                             "density": density, "seed": seed, **report}
        write_json(staging / "manifest.json", manifest)
        return registry.add(staging, name=name, domain=manifest["domain"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
