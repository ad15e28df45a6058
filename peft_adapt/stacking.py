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

from .errors import UserInputError
from .formats import ADAPTER_WEIGHTS, Manifest, read_manifest

STACK_SEPARATOR = "+"  # `books-domain+sentiment`: registry names cannot hold a '+'
MAX_PARTS = 4  # each part adds its rank to the stack's slot: a request naming hundreds must not size the stacks
DOMAIN_TASKS = {"classification": ("masked_lm", "classification"), "causal_lm": ("causal_lm",),
                "token_classification": ("masked_lm", "token_classification")}


def stack_parts(ref: str) -> list[str]:
    """The parts of a stack reference, bottom first; a plain reference is a stack of one."""
    parts = ref.split(STACK_SEPARATOR)
    if any(not p.strip() for p in parts):
        raise UserInputError(f"{ref!r}: a stack names its adapters joined by '+', bottom first, e.g. books-domain+sentiment")
    if len(parts) > MAX_PARTS or len(set(parts)) != len(parts):
        raise UserInputError(f"{ref[:200]!r}: a stack names at most {MAX_PARTS} different adapters, each once")
    return parts


def is_stack(ref: str) -> bool:
    return STACK_SEPARATOR in ref and not Path(ref).exists()


def check_part(source: str, manifest: Manifest, task: str, top: bool) -> None:
    """A stack's top part does the serving task; the parts under it are LoRA domain adapters of that base."""
    from .methods import method  # here, not at the top: the registry reads this module and stays off the methods

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
        from .methods import method_of_folder

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
    from .fingerprint import fingerprint_differences
    from .registry import is_folder_ref

    if is_folder_ref(ref):
        folder, source, version = Path(ref).expanduser(), ref, None
        manifest = read_manifest(folder)
    else:
        entry = registry.get(ref)
        folder, source, version = entry.path, entry.ref, entry.version
        manifest = read_manifest(folder)
    check_part(source, manifest, task, top=False)
    diffs = fingerprint_differences(manifest.base_fingerprint, fingerprint)
    if diffs:
        raise UserInputError(f"stack_on: {source} was trained on base {manifest.base_model!r}, not on this recipe's base: "
                             f"{diffs[0]}. A stack's parts must share one base")
    record = {"ref": source, "name": manifest.name, "version": version, "task": manifest.task,
              "weights_sha256": manifest.files.get(ADAPTER_WEIGHTS), "base_fingerprint": manifest.base_fingerprint.get("id")}
    return folder, record


def recorded_domain(record: dict, registry) -> Path:
    """The folder of the domain adapter a task adapter's manifest says it was trained on: the version of that name
    whose weights have the recorded sha256 (after an export and import its version number may differ)."""
    from .registry import is_folder_ref

    ref, wanted = record["ref"], record.get("weights_sha256")
    if is_folder_ref(ref):
        candidates = [Path(ref).expanduser()] if (Path(ref).expanduser() / "manifest.json").is_file() else []
    else:
        name = record.get("name") or ref.partition("@")[0]
        entries = sorted(registry.list(name=name), key=lambda e: e.version != record.get("version"))
        candidates = [e.path for e in entries]
    for folder in candidates:
        if not wanted or read_manifest(folder).files.get(ADAPTER_WEIGHTS) == wanted:
            return folder
    raise UserInputError(f"this adapter was trained on top of domain adapter {ref}, which is not here with the same "
                         f"weights ({len(candidates)} version(s) of that name checked): register that domain adapter "
                         f"first, or serve the task adapter under another domain adapter as DOMAIN+TASK")


def check_stack(manifest: Manifest, registry) -> None:
    """Before a task adapter trained on a domain adapter is registered: that domain adapter is in `registry` (the
    same weights) and was trained on the same base."""
    under = read_manifest(recorded_domain(manifest.stack_on, registry))
    if under.base_fingerprint.get("id") != manifest.base_fingerprint.get("id"):
        raise UserInputError(f"{manifest.name} stacks on {manifest.stack_on['ref']}, which was trained on base "
                             f"{under.base_model!r} (fingerprint {under.base_fingerprint.get('id')}), not on its own "
                             f"base {manifest.base_model!r} ({manifest.base_fingerprint.get('id')}): a stack's parts "
                             f"must share one base")
