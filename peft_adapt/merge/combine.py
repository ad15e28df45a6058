"""Combine several adapters of one base and one method into a new registered adapter.

Read the parents through the method table, combine them, write a folder of the method's format whose manifest
records the parents, weights and method, and register it. Methods whose adaptation is a weight delta
independent of the base (LoRA: `site_delta`) take every merge method:
- `cat`: the factors concatenated along the rank: exactly sum_i w_i delta_i, rank = sum of ranks;
- `svd`: sum_i w_i delta_i truncated by SVD to `rank` (default: the largest parent rank);
- `linear`, `magnitude_prune`, `ties`, `dare_linear`, `dare_ties`: see `methods.py`; the merged delta is
  re-compressed to `rank` (default: the sum of the parents' ranks, so `linear` loses nothing).
Other methods combine by `linear` averaging of adapters of one shape (their own `combine`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import UserInputError
from ..formats import Manifest, build_manifest, read_adapter_config, write_manifest
from ..methods import TABLE, AdapterWeights, method
from ..methods.base import average_heads
from ..models.memory import tensors_in_own_mappings
from ..registry.refs import check_name
from .methods import DELTA_METHODS

METHODS = ("cat", "svd", *DELTA_METHODS)


def merge_deltas(adapting, parents: list[AdapterWeights], weights: list[float], how: str, density: float = 1.0,
                 seed: int = 0, rank: int | None = None) -> tuple[AdapterWeights, dict]:
    """Parents whose sites are weight deltas, merged by `how` and re-compressed; with a report of what that lost."""
    if how not in METHODS:
        raise UserInputError(f"merge method {how!r} is not known; use one of {', '.join(METHODS)}")
    if len(parents) != len(weights):
        raise UserInputError(f"{len(weights)} weights for {len(parents)} adapters; give one weight per adapter")
    if not 0 < density <= 1:
        raise UserInputError(f"density must be in (0, 1], got {density}")
    if how == "cat":
        merged = adapting.combine(list(zip(parents, weights)))
        return merged, {"relative_error_max": 0.0, "rank": merged.extent}
    paths = sorted(set().union(*(p.sites for p in parents)))
    generator = torch.Generator().manual_seed(seed)
    target = rank or (max(p.extent for p in parents) if how == "svd" else sum(p.extent for p in parents))
    delta_fn = DELTA_METHODS["linear" if how == "svd" else how]
    head = average_heads([p.head for p in parents], weights)
    merged, errors = None, {}
    with tensors_in_own_mappings():  # models/memory.py: each module's temporaries go back to the system
        for path in paths:  # one module's dense delta at a time: all of them at once would be the base's size in fp32
            per_parent = [adapting.site_delta(p.sites[path]) if path in p.sites else None for p in parents]
            shape = next(d.shape for d in per_parent if d is not None)
            per_parent = [d if d is not None else torch.zeros(shape) for d in per_parent]
            one, error = adapting.from_deltas({path: delta_fn(per_parent, weights, density, generator)}, target, head)
            errors |= error
            if merged is None:
                merged = one
            else:
                merged.sites |= one.sites
    return merged, {"relative_error_max": max(errors.values()), "relative_error_mean": sum(errors.values()) / len(errors),
                    "rank": target}


def _check_parents(entries, manifests: list[Manifest]) -> None:
    first, head = manifests[0], entries[0]
    for e, m in zip(entries, manifests):
        if m.method != first.method:
            raise UserInputError(f"{e.ref} is a {m.method} adapter and {head.ref} a {first.method} one; "
                                 f"only adapters of one method can be merged")
        if m.base_fingerprint.get("id") != first.base_fingerprint.get("id"):
            raise UserInputError(
                f"{e.ref} was trained on base {m.base_model!r} ({m.base_fingerprint.get('id')}) and {head.ref} on "
                f"{first.base_model!r} ({first.base_fingerprint.get('id')}); only adapters of one base can be merged")
        if m.task != first.task:
            raise UserInputError(f"{e.ref} is a {m.task} adapter and {head.ref} a {first.task} one")
        if m.labels != first.labels:
            raise UserInputError("classification adapters can be combined only when all have the same label map")


def combine_adapters(registry, refs: list[str], how: str, name: str, weights: list[float] | None = None,
                     density: float = 1.0, seed: int = 0, rank: int | None = None, domain: str | None = None):
    """Merge registry adapters `refs` into a new adapter registered as `name`; returns its entry."""

    check_name(name)
    if len(refs) < 1:
        raise UserInputError("merge needs at least one adapter")
    weights = list(weights) if weights is not None else [1.0 / len(refs)] * len(refs)
    entries = [registry.get(ref) for ref in refs]
    manifests = [e.manifest for e in entries]
    if manifests[0].method not in TABLE:
        raise UserInputError(f"{entries[0].ref} is a {manifests[0].method} model, not an adapter; merging combines adapters")
    _check_parents(entries, manifests)
    adapting = method(manifests[0].method)
    parents = [adapting.read(e.path) for e in entries]
    if adapting.delta_merges:
        merged, report = merge_deltas(adapting, parents, weights, how, density, seed, rank)
    elif how != "linear":
        raise UserInputError(f"{adapting.name} adapters combine by linear averaging only (--method linear)")
    else:
        merged, report = adapting.combine(list(zip(parents, weights))), {"relative_error_max": 0.0}
    staging = Path(tempfile.mkdtemp(prefix="merge-"))
    try:
        adapting.write(merged, staging, read_adapter_config(entries[0].path).data)
        first = manifests[0]
        manifest = build_manifest(
            staging, base=first.base, name=name, domain=domain or "+".join(m.domain or "?" for m in manifests),
            method=first.method, task=first.task, labels=first.labels, pooling=first.pooling,
            base_fingerprint=first.base_fingerprint, recipe=first.recipe,
            data_sha256={e.ref: m.data_sha256 for e, m in zip(entries, manifests)},
            merge={"method": how, "parents": [e.ref for e in entries], "weights": weights, "density": density,
                   "seed": seed, **report},
        )
        write_manifest(staging, manifest)
        return registry.add(staging, name=name, domain=manifest.domain)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
