"""The base fingerprint: what identifies the base model an adapter fits.

Everything is read from the checkpoint's files, never from tensors in memory (which differ by
quantization), so one base has one fingerprint however it is loaded: the architecture, the shape of
every weight matrix (grouped across layers), the vocabulary size, and a hash of a fixed sample of the
weight bytes (the first and last 4 KiB of every tensor, read straight from the safetensors files).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

from ..errors import UserInputError

SAMPLE_BYTES = 4096


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its tensor data begins."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserInputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise UserInputError(f"{path}: not a safetensors file (header length {size} is implausible)")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserInputError(f"{path}: corrupt safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def layer_pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def base_fingerprint(model_path: str | Path) -> dict:
    """Fingerprint of the checkpoint in `model_path` (a folder with config.json and safetensors)."""
    folder = Path(model_path)
    config = json.loads((folder / "config.json").read_text())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserInputError(
            f"{folder}: no *.safetensors weight files, so no fingerprint can be taken. Convert the "
            f"checkpoint to safetensors (transformers: model.save_pretrained(dir, safe_serialization=True))."
        )
    module_shapes: dict[str, dict] = {}
    weights = hashlib.sha256()
    tensors: list[tuple[str, dict, Path, int]] = []
    for path in files:
        header, data_start = read_safetensors_header(path)
        tensors += [(name, info, path, data_start) for name, info in header.items()]
    for name, info, path, data_start in sorted(tensors, key=lambda t: t[0]):
        shape = info["shape"]
        if name.endswith(".weight") and len(shape) == 2:
            entry = module_shapes.setdefault(layer_pattern(name[: -len(".weight")]), {"shape": shape, "count": 0})
            entry["count"] += 1
        start, end = info["data_offsets"]
        weights.update(f"{name}|{info['dtype']}|{shape}|".encode())
        with open(path, "rb") as f:
            f.seek(data_start + start)
            weights.update(f.read(min(SAMPLE_BYTES, end - start)))
            if end - start > 2 * SAMPLE_BYTES:
                f.seek(data_start + end - SAMPLE_BYTES)
                weights.update(f.read(SAMPLE_BYTES))
    parts = {
        "architecture": (config.get("architectures") or [config.get("model_type", "unknown")])[0],
        "model_type": config.get("model_type"),
        "vocab_size": config.get("vocab_size"),
        "module_shapes": module_shapes,
        "weights_sha256": weights.hexdigest(),
    }
    parts["id"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return parts


def fingerprint_differences(expected: dict, found: dict) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they are the same base)."""
    diffs = []
    for key in ("architecture", "vocab_size"):
        if expected.get(key) != found.get(key):
            diffs.append(f"{key}: {expected.get(key)} vs {found.get(key)}")
    exp_mod, found_mod = expected.get("module_shapes", {}), found.get("module_shapes", {})
    for name in sorted(set(exp_mod) | set(found_mod)):
        a, b = exp_mod.get(name), found_mod.get(name)
        if a != b:
            fmt = lambda e: "absent" if e is None else f"{e['shape']} x{e['count']}"  # noqa: E731
            diffs.append(f"module {name}: {fmt(a)} vs {fmt(b)}")
    if not diffs and expected.get("weights_sha256") != found.get("weights_sha256"):
        diffs.append("weights: same shapes, different weight values")
    return diffs
