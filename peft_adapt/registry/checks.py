"""`registry verify` and `registry gc`: every checksum recomputed, and what no index entry reaches (left by a
crash) listed or removed, for either backend."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..errors import UserInputError
from ..formats import check_safetensors, verify_checksums
from .entries import AdapterEntry, VerifyReport


def verify(registry) -> VerifyReport:
    """Recompute every checksum; list folders (or blobs) no index entry reaches (left by crashes)."""
    entries = registry.list()
    if registry.objects:
        return _verify_objects(registry, entries)
    problems = []
    for e in entries:
        if not e.path.is_dir():
            problems.append(f"{e.ref}: folder {e.path} is missing")
            continue
        try:
            manifest = e.manifest
            for f in e.path.glob("*.safetensors"):
                check_safetensors(f)
        except UserInputError as exc:
            problems.append(f"{e.ref}: {exc}")
            continue
        if manifest.version != e.version or manifest.name != e.name:
            problems.append(f"{e.ref}: manifest says {manifest.name}@{manifest.version}")
        problems += [f"{e.ref}: {p}" for p in verify_checksums(e.path, manifest)]
        if not manifest.files:
            problems.append(f"{e.ref}: the manifest lists no weight files")
    known = {e.path for e in entries}
    orphans = [str(p) for p in sorted((registry.root / "adapters").glob("*/*")) if p not in known]
    staging = registry.root / ".staging"
    orphans += [str(p) for p in sorted(staging.iterdir())] if staging.is_dir() else []
    return VerifyReport(len(entries), problems, orphans)


def _verify_objects(registry, entries: list[AdapterEntry]) -> VerifyReport:
    """Every blob of every version re-read from the store and re-hashed; unreferenced blobs are orphans."""
    problems, used = [], set()
    for e in entries:
        found, blobs = registry.objects.version_problems(e.location, e.ref)
        problems += found
        used |= blobs
        if not found:
            manifest = registry.objects.manifest_of(e.location, e.ref)
            if manifest.version != e.version or manifest.name != e.name:
                problems.append(f"{e.ref}: manifest says {manifest.name}@{manifest.version}")
    orphans = [path for path, _ in registry.objects.unreferenced(used)]
    return VerifyReport(len(entries), problems, orphans)


def collect_garbage(registry, min_age_seconds: float = 3600) -> list[str]:
    """Delete orphan folders (or blobs) older than `min_age_seconds` (younger ones may belong to a live writer)."""
    registry._require_writable("collect garbage")
    if registry.objects:
        used = set()
        for e in registry.list():
            used |= registry.objects.blobs_of(e.location, e.ref)  # a version whose manifest is unreadable: gc stops
        old = [path for path, age in registry.objects.unreferenced(used) if age >= min_age_seconds]
        for path in old:
            registry.objects.remove_blob(path)
        return old
    removed = []
    now = time.time()
    for path in map(Path, verify(registry).orphans):
        if now - path.stat().st_mtime >= min_age_seconds:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed
