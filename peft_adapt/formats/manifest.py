"""`manifest.json`: what an adapter is, what it was trained on and how well it did, and the sha256 of every file."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import UserInputError
from ..models.builtin_models import sha256_file
from ..models.model_files import BaseSpec
from .names import MANIFEST, MANIFEST_VERSION, read_json, write_json


def plain_file_name(name: str) -> bool:
    """A name of a file in this folder: no path separator, not `.` or `..`, no NUL or control character."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..") and "/" not in name
            and "\\" not in name and name.isprintable())


class Manifest(BaseModel):
    """What an adapter is, what it fits, what it was trained on, and how well it did. The base it was trained on
    (model and quantization) is stored once, in `base`; everything else reads it from there."""

    model_config = ConfigDict(extra="allow")  # fields of later versions travel untouched
    manifest_version: int = MANIFEST_VERSION
    name: str = ""
    domain: str | None = None
    version: int | None = None
    method: str
    task: str = "causal_lm"
    labels: list[str] | None = None
    pooling: str | None = None
    base: BaseSpec
    base_fingerprint: dict = Field(default_factory=dict)
    recipe: dict = Field(default_factory=dict)
    data_sha256: dict = Field(default_factory=dict)
    metrics: dict = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)
    created: str | None = None
    library_versions: dict = Field(default_factory=dict)
    merge: dict | None = None
    imported_from: str | None = None
    stack_on: dict | None = None  # a task adapter trained on a frozen domain adapter: which one (`stacking.py`)

    @field_validator("files")
    @classmethod
    def _names_in_the_folder(cls, files: dict[str, str]) -> dict[str, str]:
        """A manifest lists files of its own folder by plain name: one naming `/etc/shadow`, `../x` or
        `/proc/self/fd/0` is refused before any file is opened (checking it would read and hash that file)."""
        for name in files:
            if not plain_file_name(name):
                raise ValueError(f"it lists a file {name[:100]!r} outside its folder; a manifest names the files "
                                 f"beside it by plain name")
        return files

    @model_validator(mode="before")
    @classmethod
    def _from_version_1(cls, data):
        """Version 1 kept the base three times (base_model, quantization, recipe.base); read it once, from the recipe."""
        if isinstance(data, dict) and "base" not in data:
            data = dict(data)
            base = dict(((data.get("recipe") or {}).get("base")) or {"model": data.get("base_model")})
            quantization = (data.pop("quantization", None) or {}).get("quantization")
            if "quantization" not in base and quantization in ("none", "int8", "nf4", "fp4"):
                base["quantization"] = quantization
            base.setdefault("quantization", "none")
            data["base"] = base
            data.pop("base_model", None)
        return data

    @property
    def base_model(self) -> str:
        return self.base.model

    @property
    def quantization(self) -> str:
        return self.base.quantization

    @property
    def max_length(self) -> int | None:
        return ((self.recipe or {}).get("task") or {}).get("max_length")

    @property
    def task_spec(self) -> dict:
        """The recipe's task section, with the task type even where the recipe is gone (imported adapters)."""
        return {"type": self.task} | ((self.recipe or {}).get("task") or {})

    def dump(self) -> dict:
        return self.model_dump(mode="json")


def library_versions() -> dict:
    versions = {}
    for dist in ("peft-adapt", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def build_manifest(folder: Path, *, base: BaseSpec, **fields) -> Manifest:
    """A new manifest for the files now in `folder`."""
    return Manifest(base=base, files=file_checksums(folder),
                    created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    library_versions=library_versions(), **fields)


def read_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserInputError(f"{folder}: no {MANIFEST}; expected a folder written by `peft-adapt train`")
    data = read_json(path)
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise UserInputError(f"{path}: not a manifest this version reads ({where}: {first['msg']})") from None


def write_manifest(folder: Path, manifest: Manifest) -> None:
    write_json(Path(folder) / MANIFEST, manifest.dump())


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file in an adapter folder but the manifest itself: weights, configs and what travels with them."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).iterdir())
            if p.is_file() and not p.is_symlink() and p.name != MANIFEST and not p.name.startswith(".")}


def verify_checksums(folder: Path, manifest: Manifest) -> list[str]:
    """Problems with the files the manifest lists (missing or changed); empty when all match."""
    problems = []
    for name, expected in manifest.files.items():
        path = Path(folder) / name
        if path.is_symlink() or (path.exists() and not path.is_file()):  # never open what a link or FIFO leads to
            problems.append(f"{path}: {'a symbolic link' if path.is_symlink() else 'not a regular file'}")
            continue
        if not path.is_file():
            problems.append(f"{path}: missing (the manifest lists it)")
            continue
        found = sha256_file(path)
        if found != expected:
            problems.append(f"{path}: sha256 {found[:12]}... does not match the manifest's {expected[:12]}...")
    return problems
