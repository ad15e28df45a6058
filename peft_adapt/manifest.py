"""`manifest.json`: what an adapter is, what it fits, what it was trained on, and how well it did."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
from pathlib import Path

from .builtin_models import sha256_file

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def library_versions() -> dict:
    versions = {}
    for dist in ("peft-adapt", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file in an adapter folder but the manifest itself: weights, configs and what travels with them."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).iterdir())
            if p.is_file() and not p.is_symlink() and p.name != MANIFEST and not p.name.startswith(".")}


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_manifest(
    *,
    folder: Path,
    name: str,
    domain: str,
    method: str,
    task: str,
    base_model: str,
    base_fingerprint: dict,
    quantization: dict,
    recipe: dict,
    data_sha256: dict,
    metrics: dict,
    labels: list[str] | None = None,
    version: int | None = None,
) -> dict:
    return {
        "manifest_version": MANIFEST_VERSION,
        "name": name,
        "domain": domain,
        "version": version,
        "method": method,
        "task": task,
        "labels": labels,
        "base_model": base_model,
        "base_fingerprint": base_fingerprint,
        "quantization": quantization,
        "recipe": recipe,
        "data_sha256": data_sha256,
        "metrics": metrics,
        "files": file_checksums(folder),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "library_versions": library_versions(),
    }


def read_manifest(folder: str | Path) -> dict:
    from .errors import UserInputError

    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserInputError(f"{folder}: no {MANIFEST}; expected a folder written by `peft-adapt train`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: corrupt JSON ({exc.msg} at line {exc.lineno})") from None
