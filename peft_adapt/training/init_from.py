"""`init_from`: a domain's adapter starts from a registered adapter (a meta-learned initialisation, another domain's
adapter, a merge) instead of from peft's fresh initialisation.

The source must be an adapter of the same base, task, method and shapes (every tensor it holds must fit the tensor
of the same name in the new adapter, and none may be missing); its classification head is taken too when its label
map is the recipe's, and left fresh otherwise (said in the metrics).
"""

from __future__ import annotations

from ..errors import UserInputError
from ..formats import ADAPTER_WEIGHTS, read_manifest
from ..methods import method
from ..methods.base import PeftTrainedMethod
from ..models.builtin_models import sha256_file
from ..models.fingerprint import fingerprint_differences
from ..registry.refs import parse_ref, resolve


def initialise_from(model, ref: str, registry, method_name: str, task: str, fingerprint: dict,
                    labels: list[str] | None) -> dict:
    """Load `ref`'s weights into the freshly injected adapter of `model`; returns what the metrics record."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file


    located = resolve(parse_ref(ref), registry)
    folder, source = located.folder, located.source
    manifest = read_manifest(folder)
    if manifest.method != method_name:
        raise UserInputError(f"init_from: {source} is a {manifest.method} adapter; this recipe trains {method_name}")
    if manifest.task != task:
        raise UserInputError(f"init_from: {source} is a {manifest.task} adapter; this recipe trains {task}")
    diffs = fingerprint_differences(manifest.base_fingerprint, fingerprint)
    if diffs:
        raise UserInputError(f"init_from: {source} was trained on base {manifest.base_model!r}, not this recipe's: "
                             f"{diffs[0]}")
    if not isinstance(method(method_name), PeftTrainedMethod):
        raise UserInputError(f"init_from starts peft-trained adapters (lora, ia3, prefix); not {method_name}")
    saved = load_file(str(folder / ADAPTER_WEIGHTS))
    fresh = get_peft_model_state_dict(model)
    same_head = labels is not None and manifest.labels == labels
    heads = {k for k in fresh if ".classifier." in f".{k}"}
    wanted = {k for k in fresh if k not in heads or same_head}
    missing = sorted(wanted - saved.keys())
    misfits = [f"{k}: {list(saved[k].shape)} here {list(fresh[k].shape)}" for k in sorted(wanted & saved.keys())
               if saved[k].shape != fresh[k].shape]
    extra = sorted(k for k in saved.keys() - fresh.keys() if not k.startswith("base_model.model.mlm_head."))
    if missing or misfits or extra:
        problems = ([f"missing {k}" for k in missing[:3]] + misfits[:3] + [f"not in this adapter: {k}" for k in extra[:3]])
        raise UserInputError(f"init_from: {source} does not have this adapter's shape (rank, target modules): "
                             + "; ".join(problems))
    # a head of other labels stays fresh: peft's loader wants every head key, so it gets the fresh ones back
    set_peft_model_state_dict(model, {k: saved[k] for k in wanted} | {k: fresh[k] for k in heads - wanted})
    return {"ref": source, "weights_sha256": sha256_file(folder / ADAPTER_WEIGHTS), "head": bool(heads) and same_head}
