"""What a stack records and checks at registration: the domain adapter a task adapter was trained on is here, with
the same weights, on the same base."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserInputError
from ..formats import ADAPTER_WEIGHTS, Manifest, read_manifest
from .refs import Folder, parse_ref

DOMAIN_TASKS = {"classification": ("masked_lm", "classification"), "causal_lm": ("causal_lm",),
                "token_classification": ("masked_lm", "token_classification")}


def recorded_domain(record: dict, registry) -> Path:
    """The folder of the domain adapter a task adapter's manifest says it was trained on: the version of that name
    whose weights have the recorded sha256 (after an export and import its version number may differ)."""
    ref, wanted = parse_ref(record["ref"]), record.get("weights_sha256")
    if isinstance(ref, Folder):
        candidates = [Path(ref.path).expanduser()] if (Path(ref.path).expanduser() / "manifest.json").is_file() else []
    else:
        name = record.get("name") or ref.name
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
