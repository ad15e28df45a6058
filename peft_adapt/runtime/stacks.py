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
from ..methods import method, method_of_folder
from ..models.fingerprint import fingerprint_differences
from ..registry.refs import parse_ref, resolve
from ..registry.stacks import DOMAIN_TASKS
from .residency import SERVED_TASKS


def check_part(source: str, manifest: Manifest, task: str, top: bool) -> None:
    """A stack's top part does the serving task; the parts under it are LoRA domain adapters of that base."""
    if not method(manifest.method).stackable:
        raise UserInputError(f"{source} is a {manifest.method} adapter; only LoRA adapters stack (their deltas add)")
    allowed = SERVED_TASKS.get(task, (task,)) if top else DOMAIN_TASKS.get(task, (task,))
    if manifest.task not in allowed:
        where = "at the top of" if top else "under the task adapter in"
        raise UserInputError(f"{source} is a {manifest.task} adapter; {where} a {task} stack it must be "
                             f"{' or '.join(allowed)}")


class StackedDomain:
    """A frozen domain adapter whose delta is added to its base layers' outputs, for training or evaluating a task
    adapter on top of it (the method adds it: `add_frozen`)."""

    def __init__(self, model: torch.nn.Module, folder: Path, prefix: str):
        adapting = method_of_folder(folder)
        adapting.add_frozen(model, adapting.read(folder, strip_prefix="encoder." if prefix else ""), prefix)


def resolve_domain(ref: str, registry, task: str, fingerprint: dict) -> tuple[Path, dict]:
    """The domain adapter a task adapter stacks on: its folder and the record its manifest keeps, after checking
    it is a LoRA domain adapter of the same base."""
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
