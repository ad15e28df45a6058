"""The files of an adapter folder: which travel, complete safetensors, pickle only when asked, and the one atomic
folder writer (stage, fsync, rename)."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserInputError
from ..faults import crash_point
from ..models.fingerprint import read_safetensors_header
from .names import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXTRA_FILES,
    OWN_CONFIG_SUFFIX,
    PICKLE_WEIGHTS,
    SIGNATURE_FILE,
    TRAINED_WEIGHTS,
)

MIN_SIGNATURE_ROWS = 8  # routing's MIN_ROWS: a signature of fewer rows says too little about its domain


def is_adapter_file(name: str) -> bool:
    return (name == ADAPTER_CONFIG or name.endswith(OWN_CONFIG_SUFFIX) or name in EXTRA_FILES
            or name in PICKLE_WEIGHTS or name.endswith(".safetensors"))


def adapter_files_to_copy(folder: Path) -> list[Path]:
    """The files of an adapter folder that belong in a registry: configs, weights (safetensors, or pickle for the
    caller to convert) and EXTRA_FILES. A symbolic link, special file or file with several hard links among them is
    refused: copying it would read whatever it points at (a `notes.txt -> /etc/shadow` link, or a hard link to it,
    would land in the registry)."""
    chosen = []
    for path in sorted(Path(folder).iterdir()):
        if not is_adapter_file(path.name) or path.name.startswith("."):
            continue
        if path.is_symlink() or not path.is_file():
            kind = "a symbolic link" if path.is_symlink() else "not a regular file"
            raise UserInputError(f"{path} is {kind}; an adapter folder must hold plain files only. Copy the real file "
                                 f"in its place")
        if path.stat().st_nlink > 1:  # a hard link is the same file as one elsewhere, whatever the folder says
            raise UserInputError(f"{path} has {path.stat().st_nlink} hard links: it is also a file elsewhere, which "
                                 f"an adapter folder must not carry. Copy it (cp {path.name} x && mv x {path.name})")
        chosen.append(path)
    return chosen


def check_safetensors(path: Path) -> dict:
    """The header of a complete safetensors file; a truncated or corrupt file is refused."""
    header, data_start = read_safetensors_header(path)
    size = path.stat().st_size
    for name, info in header.items():
        if not isinstance(info, dict) or "data_offsets" not in info or "shape" not in info:
            raise UserInputError(f"{path}: corrupt safetensors header entry {name!r}")
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if data_start + end > size:
        raise UserInputError(
            f"{path}: truncated safetensors file ({size} bytes, its header describes {data_start + end}); "
            f"copy or save it again"
        )
    return header


def check_signature_file(path: Path) -> None:
    """A routing signature as routing reads it: `features` a 2-D float matrix of at least MIN_SIGNATURE_ROWS finite
    rows, `layer` a whole number from 0, `tokens` a positive number. A malformed one is refused where it is added,
    so it never reaches a router (where one bad signature failed every routed request)."""
    from safetensors import safe_open

    header = check_safetensors(path)
    info = header.get("features")
    problem = None
    if set(header) - {"__metadata__"} != {"features"} or not isinstance(info, dict):
        problem = f"it holds {sorted(k for k in header if k != '__metadata__')}; a signature holds `features` only"
    elif len(info["shape"]) != 2 or info["shape"][0] < MIN_SIGNATURE_ROWS or info["shape"][1] < 1:
        problem = f"features of shape {info['shape']}; expected [rows >= {MIN_SIGNATURE_ROWS}, hidden size]"
    elif info.get("dtype") not in ("F16", "BF16", "F32"):
        problem = f"features of dtype {info.get('dtype')}; expected F16, BF16 or F32"
    else:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        try:
            layer, tokens = int(meta.get("layer", "0")), float(meta.get("tokens", "1"))
        except ValueError:
            layer, tokens = -1, 1.0
        if layer < 0 or not (tokens > 0 and tokens < float("inf")):
            problem = f"metadata layer={meta.get('layer')!r} tokens={meta.get('tokens')!r}; expected a layer >= 0 " \
                      f"and a positive token count"
        else:
            with safe_open(str(path), "pt") as f:
                if not bool(f.get_tensor("features").float().isfinite().all()):
                    problem = "features that are not all finite (NaN or infinity)"
    if problem:
        raise UserInputError(f"{path}: not a routing signature: {problem}. Sign the adapter again "
                             f"(peft-adapt registry sign NAME TEXT_FILE)")


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The folder's safetensors weight files, checked complete; pickle-only folders need allow_pickle."""
    folder = Path(folder)
    files = sorted(f for f in folder.glob("*.safetensors") if f.name != SIGNATURE_FILE)
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


def load_pickle_weights(path: Path) -> dict:
    """Only after the caller allowed pickle: tensors only (`weights_only`); anything else is refused, not run."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"{path}: refused: not a plain file of tensors ({first[:200]}); "
                             f"only weights can be loaded from pickle, never code") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"{path}: refused: expected a mapping of names to tensors")
    return state


def convert_pickle_to_safetensors(path: Path, out: Path) -> None:
    """Only after the caller allowed pickle: load the .bin once (tensors only) and write it as safetensors."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in load_pickle_weights(path).items()}, str(out))


def tensor_shapes(files: list[Path]) -> dict[str, list[int]]:
    """Name -> shape of every tensor in the weight files (safetensors headers; pickle only if allowed before)."""
    shapes: dict[str, list[int]] = {}
    for f in files:
        if f.suffix == ".safetensors":
            shapes |= {k: list(v["shape"]) for k, v in check_safetensors(f).items()}
        else:
            shapes |= {k: list(v.shape) for k, v in load_pickle_weights(f).items()}
    return shapes


def fsync_tree(folder: Path) -> None:
    """Flush every file and directory under `folder` to disk (before a rename makes it visible)."""
    for root, _, files in os.walk(folder):
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


def publish(staging: Path, target: Path) -> None:
    """Make a fully written folder appear at `target` in one rename (fsynced first); a folder already there is moved
    aside and removed after. A crash at any point leaves the old folder or the new one, never half of one."""
    fsync_tree(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    aside = None
    if target.exists():
        aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, aside)
    crash_point("before_rename")
    os.rename(staging, target)
    fsync_dir(target.parent)
    crash_point("after_rename")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def check_output_folder(folder: Path, overwrite: bool = False, flag: str = "--overwrite") -> None:
    """Refuse, before anything is written, an output folder that would replace what this tool did not write: a file,
    or a folder that is not empty. With `overwrite`, a folder holding a previous run (its `manifest.json`) may be
    replaced; a folder of anything else never is (a recipe's name once pointed training at a user's folder)."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UserInputError(f"output {folder} exists and is not a folder; choose another output folder (--out)")
    if not folder.exists() or not any(folder.iterdir()):
        return
    previous_run = (folder / "manifest.json").is_file() and not (folder / "manifest.json").is_symlink()
    if not previous_run:
        raise UserInputError(f"output folder {folder} exists and holds files this tool did not write; it is never "
                             f"replaced: choose another output folder (--out)")
    if not overwrite:
        raise UserInputError(f"output folder {folder} holds a previous run; pass {flag} to replace it, or choose "
                             f"another output folder (--out)")


@contextmanager
def staged_folder(target: Path):
    """Write a folder beside `target`, then `publish` it: the one way training, merging and exports write folders.

        with staged_folder(out_dir) as staging:
            ...write files into staging...
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless something failed
