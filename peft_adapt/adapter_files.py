"""The adapter folder on disk: peft's files plus our `manifest.json`, checked before anything trusts them.

A folder is accepted when its config parses, every weight file is a complete safetensors file, and
every checksum in the manifest matches the file. Pickle weights (`adapter_model.bin`) are refused
unless the caller passes `allow_pickle=True`; then they are converted to safetensors on the way in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .builtin_models import sha256_file
from .errors import UserInputError
from .fingerprint import read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")
TRAINED_WEIGHTS = "trained_weights.safetensors"  # what a freezing baseline saves instead of an adapter
BOTTLENECK_CONFIG = "bottleneck_config.json"  # our own format: peft has no bottleneck adapters


def folder_kind(folder: Path) -> str:
    """`peft` (adapter_config.json), `bottleneck` (our config) or `trained_weights` (a freezing baseline)."""
    if (folder / ADAPTER_CONFIG).is_file():
        return "peft"
    if (folder / BOTTLENECK_CONFIG).is_file():
        return "bottleneck"
    if (folder / TRAINED_WEIGHTS).is_file():
        return "trained_weights"
    raise UserInputError(
        f"{folder}: missing {ADAPTER_CONFIG}; an adapter folder needs its config beside its weights "
        f"({ADAPTER_CONFIG} for peft methods, {BOTTLENECK_CONFIG} for bottleneck adapters)"
    )


def check_safetensors(path: Path) -> dict:
    """The header of a complete safetensors file; a truncated or corrupt file is refused."""
    header, data_start = read_safetensors_header(path)
    size = path.stat().st_size
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if data_start + end > size:
        raise UserInputError(
            f"{path}: truncated safetensors file ({size} bytes, its header describes {data_start + end}); "
            f"copy or save it again"
        )
    for name, info in header.items():
        if not isinstance(info, dict) or "data_offsets" not in info or "shape" not in info:
            raise UserInputError(f"{path}: corrupt safetensors header entry {name!r}")
    return header


def read_adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise UserInputError(
            f"{folder}: missing {ADAPTER_CONFIG}; an adapter folder needs peft's config beside its weights "
            f"(save it with model.save_pretrained(folder))"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: corrupt JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UserInputError(f"{path}: not a peft adapter config (no peft_type)")
    return config


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The folder's safetensors weight files, checked complete; pickle-only folders need allow_pickle."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [folder / n for n in PICKLE_WEIGHTS if (folder / n).is_file()]
        if pickled and not allow_pickle:
            raise UserInputError(
                f"{folder}: the adapter weights are pickle ({pickled[0].name}), which can run code when loaded. "
                f"Re-save them as safetensors, or pass allow_pickle=True (--allow-pickle) if you trust the source"
            )
        if not pickled:
            raise UserInputError(f"{folder}: no weight file ({ADAPTER_WEIGHTS} or {TRAINED_WEIGHTS})")
        return pickled
    for f in files:
        check_safetensors(f)
    return files


def verify_checksums(folder: Path, manifest: dict) -> list[str]:
    """Problems with the files the manifest lists (missing or changed); empty when all match."""
    problems = []
    for name, expected in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing (the manifest lists it)")
            continue
        found = sha256_file(path)
        if found != expected:
            problems.append(f"{path}: sha256 {found[:12]}... does not match the manifest's {expected[:12]}...")
    return problems


def convert_pickle_to_safetensors(path: Path, out: Path) -> None:
    """Only after the caller allowed pickle: load the .bin once and write it as safetensors."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(path, map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))


def fsync_tree(folder: Path) -> None:
    """Flush every file and directory under `folder` to disk (before a rename makes it visible)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
