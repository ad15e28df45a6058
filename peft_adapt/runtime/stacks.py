"""Domain adapters under task adapters (AdapterHub's MAD-X `Stack`, for LoRA).

A *domain* adapter learns a domain's text without labels (task `masked_lm` on an encoder, `causal_lm` on a decoder);
a *task* adapter is trained on top of it (`stack_on: <registry ref>` in its recipe) with the domain adapter frozen.
Both are LoRA, so the stack's delta at each layer is the sum of its parts' deltas: training adds the frozen
domain delta to the base layer's output through a forward hook (peft's LoRA wraps the hooked layer, so the task
delta adds on top), and the runtime serves `domain+task` as one LoRA of the parts' concatenated factors. The
domain part can be swapped for another domain's at serving time (train on books, serve kitchen under the kitchen
domain adapter).

The task adapter's manifest records the stack (`stack_on`: the domain adapter's ref, version and weights' sha256);
a stack whose parts were trained on different bases is refused when trained, registered and served.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserInputError
from ..formats import ADAPTER_WEIGHTS, Manifest, read_manifest
from ..registry.stacks import DOMAIN_TASKS


def check_part(source: str, manifest: Manifest, task: str, top: bool) -> None:
    """A stack's top part does the serving task; the parts under it are LoRA domain adapters of that base."""
    from ..methods import method  # here, not at the top: the registry reads this module and stays off the methods

    if not method(manifest.method).stackable:
        raise UserInputError(f"{source} is a {manifest.method} adapter; only LoRA adapters stack (their deltas add)")
    allowed = (task,) if top else DOMAIN_TASKS.get(task, (task,))
    if manifest.task not in allowed:
        where = "at the top of" if top else "under the task adapter in"
        raise UserInputError(f"{source} is a {manifest.task} adapter; {where} a {task} stack it must be "
                             f"{' or '.join(allowed)}")


class StackedDomain:
    """A frozen domain adapter whose delta is added to its base layers' outputs (forward hooks), for training or
    evaluating a task adapter on top of it."""

    def __init__(self, model: torch.nn.Module, folder: Path, prefix: str):
        from ..methods import method_of_folder

        weights = method_of_folder(folder).read(folder, strip_prefix="encoder." if prefix else "")
        for path, (a, b, scale) in weights.sites.items():
            layer = model.get_submodule(prefix + path)
            layer = getattr(layer, "base_layer", layer)
            device = next(layer.parameters()).device
            a = a.float().to(device)
            b = (b.float() * scale).to(device)
            layer.register_forward_hook(_adds_delta(a, b))


def _adds_delta(a: torch.Tensor, b: torch.Tensor):
    def hook(module, args, output):
        x = args[0]
        return output + ((x.to(a.dtype) @ a.T) @ b.T).to(output.dtype)

    return hook


def resolve_domain(ref: str, registry, task: str, fingerprint: dict) -> tuple[Path, dict]:
    """The domain adapter a task adapter stacks on: its folder and the record its manifest keeps, after checking
    it is a LoRA domain adapter of the same base."""
    from ..models.fingerprint import fingerprint_differences
    from ..registry.refs import parse_ref, resolve

    located = resolve(parse_ref(ref), registry)
    folder, source, version = located.folder, located.source, located.version
    manifest = read_manifest(folder)
    check_part(source, manifest, task, top=False)
    diffs = fingerprint_differences(manifest.base_fingerprint, fingerprint)
    if diffs:
        raise UserInputError(f"stack_on: {source} was trained on base {manifest.base_model!r}, not on this recipe's base: "
                             f"{diffs[0]}. A stack's parts must share one base")
    record = {"ref": source, "name": manifest.name, "version": version, "task": manifest.task,
              "weights_sha256": manifest.files.get(ADAPTER_WEIGHTS), "base_fingerprint": manifest.base_fingerprint.get("id")}
    return folder, record
