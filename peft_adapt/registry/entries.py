"""What the registry answers: one registered version (`AdapterEntry`) and a verification report."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from ..formats import Manifest, read_manifest


@dataclass
class AdapterEntry:
    name: str
    version: int
    domain: str | None
    method: str | None
    task: str | None
    base_model: str | None
    fingerprint: str | None
    quantization: str | None
    created: str | None
    metrics: dict
    location: str  # a folder, or (shared backend) the sha256 of the version's manifest in the store
    tags: list[str] = field(default_factory=list)
    fetch: Callable[["AdapterEntry"], Path] | None = field(default=None, repr=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @cached_property
    def path(self) -> Path:
        """The version's folder: in a shared registry, fetched into the local cache and checked on first use."""
        return self.fetch(self) if self.fetch else Path(self.location)

    @property
    def manifest(self) -> Manifest:
        return read_manifest(self.path)

    def to_json(self) -> dict:
        return {
            "name": self.name, "version": self.version, "domain": self.domain, "method": self.method,
            "task": self.task, "base": self.base_model, "fingerprint": self.fingerprint,
            "quantization": self.quantization, "created": self.created, "metrics": self.metrics,
            "tags": self.tags, "path": self.location if self.fetch else str(self.path),
        }


@dataclass
class VerifyReport:
    checked: int
    problems: list[str]
    orphans: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems
