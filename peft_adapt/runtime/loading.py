"""Load what `peft-adapt train` saved back onto its base, after checking that the base fits.

Beside the loaders, not in storage: the registry only stores and checks files; `load_registered` is how a
registered adapter is loaded onto a model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserInputError
from ..formats import (
    TRAINED_WEIGHTS,
    Manifest,
    adapter_fit_problems,
    folder_kind,
    read_adapter_config,
    read_manifest,
    tensor_shapes,
    verify_checksums,
    weight_files,
)
from ..methods import method_of_folder
from ..models.backbone import Backbone, load_backbone
from ..models.fingerprint import fingerprint_differences
from ..registry.stacks import recorded_domain
from ..registry.store import Registry
from .stacks import StackedDomain

log = logging.getLogger(__name__)


@dataclass
class LoadedAdapter:
    model: torch.nn.Module
    backbone: Backbone
    manifest: Manifest


def check_same_base(manifest: Manifest, backbone: Backbone, source: str, force: bool = False) -> None:
    """Refuse an adapter whose base fingerprint differs from the loaded base's, unless forced."""
    expected = manifest.base_fingerprint
    diffs = fingerprint_differences(expected, backbone.fingerprint)
    if diffs and not force:
        # the whole comparison goes to the log (and `registry show --json` has the fingerprint); the error stays short
        log.warning("%s does not fit the base %s: %s", source, backbone.spec.model, "; ".join(diffs))
        more = f" (and {len(diffs) - 1} more difference{'s' if len(diffs) > 2 else ''})" if len(diffs) > 1 else ""
        raise UserInputError(
            f"{source} was trained on base {manifest.base_model!r} (fingerprint {expected.get('id')}), not on "
            f"{backbone.spec.model!r} ({backbone.fingerprint['id']}): {diffs[0]}{more}. Load it onto the base it was "
            f"trained on, or pass force=True / --force if you know better."
        )
    if diffs:
        log.warning("%s: loading onto a different base despite: %s", source, "; ".join(diffs[:3]))
    if manifest.quantization != backbone.spec.quantization:
        log.info("%s was trained on a %s base and runs on a %s base", source, manifest.quantization,
                 backbone.spec.quantization)


def require_checksums(folder: Path, manifest: Manifest, source: str) -> None:
    problems = verify_checksums(folder, manifest)
    if problems:
        raise UserInputError(f"{source}: checksum mismatch, refusing to load: " + "; ".join(problems))


def check_shapes_fit(folder: Path, backbone: Backbone, source: str) -> None:
    """For a folder without a manifest: every adapter matrix sits on a layer of this base with matching features."""
    import json

    config = read_adapter_config(folder)
    base_config = json.loads((backbone.path / "config.json").read_text(encoding="utf-8"))
    problems = adapter_fit_problems(tensor_shapes(weight_files(folder)), backbone.fingerprint, base_config, config)
    if problems:
        raise UserInputError(f"{source} does not fit the base {backbone.spec.model!r}: " + "; ".join(problems[:5]))


def check_adapter(folder: Path, manifest: Manifest, backbone: Backbone, source: str, force: bool = False) -> None:
    """Before anything is loaded: the files are what the manifest says, and the base fits."""
    require_checksums(folder, manifest, source)
    check_same_base(manifest, backbone, source, force)


def load_trained(folder: str | Path, quantization: str | None = None, device: str = "auto", force: bool = False,
                 backbone: Backbone | None = None, source: str | None = None, registry=None) -> LoadedAdapter:
    """`folder`'s adapter applied to `backbone`, or to its own base loaded as its manifest says
    (in `quantization` if given), after checking the files and that the base fits. A task adapter trained on a
    domain adapter (`stack_on`) runs on top of that domain adapter, found in `registry` (default: the default one)."""
    from safetensors.torch import load_file


    folder = Path(folder)
    source = source or str(folder)
    manifest = read_manifest(folder)
    require_checksums(folder, manifest, source)  # before loading a base for nothing
    if backbone is None:
        base = manifest.base.model_copy(update={"device": device} | ({"quantization": quantization} if quantization else {}))
        labels = manifest.labels
        crf = (manifest.recipe or {}).get("task", {}).get("crf")
        backbone = load_backbone(base, manifest.task, len(labels) if labels else None, manifest.pooling or "auto",
                                 labels if crf else None)
    check_same_base(manifest, backbone, source, force)
    if manifest.stack_on:
        under = recorded_domain(manifest.stack_on, registry or Registry())
        StackedDomain(backbone.model, under, "encoder." if manifest.task != "causal_lm" else "")
    if folder_kind(folder) == "adapter":
        model = method_of_folder(folder).load_for_eval(backbone.model, folder)
    else:
        model = backbone.model
        state = load_file(str(folder / TRAINED_WEIGHTS), device=str(backbone.device))
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise UserInputError(f"{folder / TRAINED_WEIGHTS}: weights {result.unexpected_keys[:3]} fit no parameter of the base")
    model.eval()
    return LoadedAdapter(model, backbone, manifest)


def load_registered(registry, ref: str, backbone: Backbone | None = None, quantization: str | None = None,
                    force: bool = False) -> LoadedAdapter:
    """The registered adapter `ref` applied to `backbone` (or to its own base, loaded), after the fingerprint check."""
    entry = registry.get(ref)
    return load_trained(entry.path, quantization=quantization, force=force, backbone=backbone, source=entry.ref,
                        registry=registry)
