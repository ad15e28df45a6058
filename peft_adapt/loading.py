"""Load what `peft-adapt train` saved back onto its base, after checking that the base fits."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter_files import TRAINED_WEIGHTS, folder_kind, verify_checksums
from .backbone import Backbone, BaseSpec, load_backbone
from .errors import UserInputError
from .fingerprint import fingerprint_differences
from .manifest import read_manifest

log = logging.getLogger(__name__)


@dataclass
class LoadedAdapter:
    model: torch.nn.Module
    backbone: Backbone
    manifest: dict


def check_base_fits(manifest: dict, backbone: Backbone, source: str, force: bool = False) -> None:
    """Refuse an adapter whose base fingerprint differs from the loaded base's, unless forced."""
    expected = manifest["base_fingerprint"]
    diffs = fingerprint_differences(expected, backbone.fingerprint)
    if diffs and not force:
        # the whole comparison goes to the log (and `registry show --json` has the fingerprint); the error stays short
        log.warning("%s does not fit the base %s: %s", source, backbone.spec.model, "; ".join(diffs))
        more = f" (and {len(diffs) - 1} more difference{'s' if len(diffs) > 2 else ''})" if len(diffs) > 1 else ""
        raise UserInputError(
            f"{source} was trained on base {manifest['base_model']!r} (fingerprint {expected.get('id')}), not on "
            f"{backbone.spec.model!r} ({backbone.fingerprint['id']}): {diffs[0]}{more}. Load it onto the base it was "
            f"trained on, or pass force=True / --force if you know better."
        )
    if diffs:
        log.warning("%s: loading onto a different base despite: %s", source, "; ".join(diffs[:3]))
    trained_q = manifest.get("quantization", {}).get("quantization")
    if trained_q and trained_q != backbone.spec.quantization:
        log.info("%s was trained on a %s base and runs on a %s base", source, trained_q, backbone.spec.quantization)


def require_checksums(folder: Path, manifest: dict, source: str) -> None:
    problems = verify_checksums(folder, manifest)
    if problems:
        raise UserInputError(f"{source}: checksum mismatch, refusing to load: " + "; ".join(problems))


def check_fits_base(folder: Path, backbone: Backbone, source: str) -> None:
    """For a folder without a manifest: every adapter matrix sits on a layer of this base with matching features."""
    import json

    from .adapter_files import adapter_fit_problems, read_folder_config, tensor_shapes, weight_files

    kind, config = read_folder_config(folder)
    base_config = json.loads((backbone.path / "config.json").read_text(encoding="utf-8"))
    problems = adapter_fit_problems(tensor_shapes(weight_files(folder)), backbone.fingerprint, base_config,
                                    config if kind == "peft" else None)
    if problems:
        raise UserInputError(f"{source} does not fit the base {backbone.spec.model!r}: " + "; ".join(problems[:5]))


def check_adapter(folder: Path, manifest: dict, backbone: Backbone, source: str, force: bool = False) -> None:
    """Before anything is loaded: the files are what the manifest says, and the base fits."""
    require_checksums(folder, manifest, source)
    check_base_fits(manifest, backbone, source, force)


def load_trained(folder: str | Path, quantization: str | None = None, device: str = "auto", force: bool = False,
                 backbone: Backbone | None = None, source: str | None = None) -> LoadedAdapter:
    """`folder`'s adapter applied to `backbone`, or to its own base loaded as its manifest says
    (in `quantization` if given), after checking the files and that the base fits."""
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = Path(folder)
    source = source or str(folder)
    manifest = read_manifest(folder)
    require_checksums(folder, manifest, source)  # before loading a base for nothing
    if backbone is None:
        base = BaseSpec.model_validate(manifest["recipe"]["base"])
        base = base.model_copy(update={"device": device} | ({"quantization": quantization} if quantization else {}))
        labels = manifest.get("labels")
        backbone = load_backbone(base, manifest["task"], len(labels) if labels else None, manifest.get("pooling") or "auto")
    check_base_fits(manifest, backbone, source, force)
    kind = folder_kind(folder)
    if kind == "peft":
        model = PeftModel.from_pretrained(backbone.model, folder, is_trainable=False)
    elif kind == "bottleneck":
        from .methods.bottleneck import load_bottleneck

        model = load_bottleneck(backbone.model, folder, backbone.model.config.model_type)
    else:
        model = backbone.model
        state = load_file(str(folder / TRAINED_WEIGHTS), device=str(backbone.device))
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise UserInputError(f"{folder / TRAINED_WEIGHTS}: weights {result.unexpected_keys[:3]} fit no parameter of the base")
    model.eval()
    return LoadedAdapter(model, backbone, manifest)
