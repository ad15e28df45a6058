"""Adapters in and out of a registry: `registry import` (a folder from elsewhere, checked against the base it must
fit) and `registry export` (a version as a plain peft folder with its manifest)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import UserInputError
from ..formats import (
    MANIFEST,
    Manifest,
    adapter_files_to_copy,
    adapter_fit_problems,
    build_manifest,
    folder_kind,
    read_adapter_config,
    read_manifest,
    tensor_shapes,
    weight_files,
)
from ..models.fingerprint import base_fingerprint, fingerprint_differences
from ..models.model_files import BaseSpec, resolve_model_path
from .entries import AdapterEntry
from .refs import check_name


def import_folder(registry, folder: str | Path, base: str | None = None, name: str | None = None,
                domain: str | None = None, tags: tuple[str, ...] | list[str] = (),
                allow_pickle: bool = False) -> AdapterEntry:
    """Register an adapter folder from elsewhere: one that `registry export` wrote (any task and method: its
    manifest travels with it and is checked), or a plain peft folder of a causal LM adapter. Either way every
    adapter matrix must fit a layer of `base` (default: the base its manifest names)."""

    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"{folder} is not a folder; `registry import` takes an adapter folder")
    adapter_files_to_copy(folder)  # links and special files are refused before any file is opened
    manifest = read_manifest(folder) if (folder / MANIFEST).is_file() else None
    if folder_kind(folder) == "trained_weights":
        raise UserInputError(f"{folder} holds a fine-tuned model's weights, not an adapter; only adapters are imported")
    config = read_adapter_config(folder)
    files = weight_files(folder, allow_pickle)
    if manifest is not None:
        registry._check_files(folder, manifest, allow_pickle)
        task, base = manifest.task, base or manifest.base_model
    else:
        task = {"CAUSAL_LM": "causal_lm", None: "causal_lm"}.get(config.task_type)
        if not config.is_peft or task is None:
            raise UserInputError(
                f"{folder}: a {config.task_type or config.method} adapter without {MANIFEST}; only causal LM "
                f"adapters (task_type CAUSAL_LM) can be imported bare, because other heads differ between peft and "
                f"this package. Import a folder written by `peft-adapt registry export`, which carries its manifest"
            )
    name = check_name(name or (manifest.name if manifest else ""))
    for t in tags:
        registry._check_tag(t)
    if not base:
        raise UserInputError(f"{folder}: name the base model it was trained on (--base MODEL)")
    base_path = resolve_model_path(base)
    fingerprint = base_fingerprint(base_path)
    if manifest is not None:
        _check_same_base(folder, manifest, fingerprint, base)
    base_config = json.loads((base_path / "config.json").read_text(encoding="utf-8"))
    problems = adapter_fit_problems(tensor_shapes(files), fingerprint, base_config, config)
    if problems:
        raise UserInputError(f"{folder} does not fit the base {base!r}: " + "; ".join(problems[:5])
                             + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    registry._require_writable(f"import {folder}")
    with registry._writing(f"import {folder}"):
        staging = registry._stage(folder, allow_pickle)
        if manifest is not None:  # it now runs on `base`, named as the user named it here
            manifest = manifest.model_copy(update={"base": manifest.base.model_copy(update={"model": base}),
                                                   "base_fingerprint": fingerprint})
        else:
            manifest = build_manifest(staging, base=BaseSpec(model=base, quantization="none"), name=name,
                                      domain=domain or name, method=config.method, task=task,
                                      base_fingerprint=fingerprint, recipe={"task": {"type": task}})
        manifest = manifest.model_copy(update={"imported_from": str(folder.resolve())})
        return registry._commit(staging, manifest, name, domain or manifest.domain or name, tags)


def export_folder(registry, ref: str, out: str | Path) -> Path:
    """Copy an adapter version into `out` as a plain peft folder (with its manifest and model card)."""
    entry = registry.get(ref)
    out = Path(out)
    check_export_target(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for src in adapter_files_to_copy(entry.path) + [entry.path / MANIFEST]:
            shutil.copyfile(src, out / src.name, follow_symlinks=False)
    except OSError as exc:
        raise UserInputError(f"cannot export {entry.ref} to {out}: {exc.strerror or exc}") from None
    return out


def check_export_target(out: Path) -> None:
    """An export writes a new folder: not into a file, not over anything."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"export target {out} is a file; give a new folder's path")
    if out.is_dir() and any(out.iterdir()):
        raise UserInputError(f"export target {out} exists and is not empty; choose a new folder")


def _check_same_base(folder: Path, manifest: Manifest, fingerprint: dict, base: str) -> None:
    """An adapter that says which base it was trained on is imported onto that base only."""

    expected = manifest.base_fingerprint
    if expected.get("id") in (None, fingerprint["id"]):
        return
    diffs = fingerprint_differences(expected, fingerprint)
    raise UserInputError(
        f"{folder} was trained on base {manifest.base_model!r} (fingerprint {expected.get('id')}), not on "
        f"{base!r} (fingerprint {fingerprint['id']}): they differ in " + "; ".join(diffs[:3])
        + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "") + ". Import it with --base naming that model"
    )
