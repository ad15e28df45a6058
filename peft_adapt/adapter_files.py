"""The adapter folder on disk: peft's files plus our `manifest.json`, checked before anything trusts them.

A folder is accepted when its config parses, every weight file is a complete safetensors file, and
every checksum in the manifest matches the file. Pickle weights (`adapter_model.bin`) are refused
unless the caller passes `allow_pickle=True`; then they are converted to safetensors on the way in.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .builtin_models import sha256_file
from .errors import UserInputError
from .fingerprint import read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")
TRAINED_WEIGHTS = "trained_weights.safetensors"  # what a freezing baseline saves instead of an adapter
BOTTLENECK_CONFIG = "bottleneck_config.json"  # our own format: peft has no bottleneck adapters
CONFIG_FILES = (ADAPTER_CONFIG, BOTTLENECK_CONFIG)
# files that travel with an adapter besides its configs and weights (each checksummed in the manifest);
# anything else in a folder is left behind
EXTRA_FILES = ("metrics.json", "log_history.json", "loss_curve.png", "README.md")


def adapter_files_to_copy(folder: Path) -> list[Path]:
    """The files of an adapter folder that belong in a registry: configs, weights (safetensors, or pickle for the
    caller to convert) and EXTRA_FILES. A symbolic link or special file among them is refused: copying it would
    read whatever it points at (a `notes.txt -> /etc/shadow` link would land in the registry)."""
    chosen = []
    for path in sorted(Path(folder).iterdir()):
        name = path.name
        known = name in CONFIG_FILES or name in EXTRA_FILES or name in PICKLE_WEIGHTS or name.endswith(".safetensors")
        if not known or name.startswith("."):
            continue
        if path.is_symlink() or not path.is_file():
            kind = "a symbolic link" if path.is_symlink() else "not a regular file"
            raise UserInputError(f"{path} is {kind}; an adapter folder must hold plain files only. Copy the real file "
                                 f"in its place")
        chosen.append(path)
    return chosen


def read_folder_config(folder: Path) -> tuple[str, dict]:
    """The folder's kind (`peft`, `bottleneck`, `trained_weights`) and its config (empty for trained weights)."""
    kind = folder_kind(folder)
    if kind == "peft":
        return kind, read_adapter_config(folder)
    if kind == "bottleneck":
        path = folder / BOTTLENECK_CONFIG
        config = _read_json(path)
        if not isinstance(config, dict) or config.get("method") != "bottleneck" or not isinstance(config.get("sites"), dict):
            raise UserInputError(f"{path}: not a bottleneck adapter config (method and sites are required)")
        return kind, config
    return kind, {}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: corrupt JSON ({exc.msg} at line {exc.lineno})") from None


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
    config = _read_json(path)
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


# ---------------------------------------------------------------- does an adapter fit a base?

_LORA_TENSOR = re.compile(r"^(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_BOTTLENECK_TENSOR = re.compile(r"^(.+)\.adapter\.(down|up)\.(weight|bias)$")
_HEAD_TENSOR = re.compile(r"^(?:.+\.)?(classifier|score|lm_head)(?:\.(?:modules_to_save|original_module)\.[^.]+)?\.(weight|bias)$")


def tensor_shapes(files: list[Path]) -> dict[str, list[int]]:
    """Name -> shape of every tensor in the weight files (safetensors headers; pickle only if allowed before)."""
    shapes: dict[str, list[int]] = {}
    for f in files:
        if f.suffix == ".safetensors":
            shapes |= {k: list(v["shape"]) for k, v in check_safetensors(f).items()}
        else:
            import torch

            shapes |= {k: list(v.shape) for k, v in load_pickle_weights(f).items()}
    return shapes


def base_module_shape(module_path: str, module_shapes: dict[str, dict]) -> list[int] | None:
    """[out, in] of the base layer an adapter names, matched by its longest known suffix: an adapter's path
    carries wrappers' prefixes (`base_model.model.`, our classifier's `encoder.`) the checkpoint does not."""
    from .fingerprint import layer_pattern

    parts = layer_pattern(module_path).split(".")
    for start in range(len(parts) - 1):
        suffix = ".".join(parts[start:])
        for pattern, entry in module_shapes.items():
            if pattern == suffix or pattern.endswith("." + suffix):
                return entry["shape"]
    return None


def adapter_fit_problems(shapes: dict[str, list[int]], fingerprint: dict, base_config: dict,
                         adapter_config: dict | None) -> list[str]:
    """Why an adapter's tensors do not fit a base (empty when they do): every LoRA or bottleneck matrix must sit
    on a layer of the base with matching features, a prefix must match its layers and width."""
    problems: dict[str, str] = {}  # one line per layer, however many of its tensors disagree
    modules = fingerprint["module_shapes"]
    matched = 0
    for key, shape in sorted(shapes.items()):
        if m := _LORA_TENSOR.match(key):
            path, which = m.group(1).removeprefix("base_model.model."), m.group(2)
            base = base_module_shape(path, modules)
            if base is None:
                problems.setdefault(path, f"{path} is not a layer of the base")
            elif which == "A" and shape[-1] != base[1]:
                problems.setdefault(path, f"{path}: lora_A takes {shape[-1]} inputs, the base layer has {base[1]}")
            elif which == "B" and shape[0] != base[0]:
                problems.setdefault(path, f"{path}: lora_B gives {shape[0]} outputs, the base layer has {base[0]}")
            matched += 1
        elif m := _BOTTLENECK_TENSOR.match(key):
            path, part = m.group(1), f"{m.group(2)}.{m.group(3)}"
            base = base_module_shape(path, modules)
            hidden = {"down.weight": shape[-1], "up.weight": shape[0], "up.bias": shape[0]}.get(part)
            if base is None:
                problems.setdefault(path, f"{path} is not a layer of the base")
            elif hidden is not None and hidden != base[0]:
                problems.setdefault(path, f"{path}: the adapter works on {hidden} features, the base layer gives {base[0]}")
            matched += 1
        elif key == "prompt_embeddings" and adapter_config is not None:
            layers, width = adapter_config.get("num_layers"), adapter_config.get("token_dim")
            base_layers = base_config.get("num_hidden_layers", base_config.get("n_layer"))
            hidden = base_config.get("hidden_size", base_config.get("n_embd")) or 0
            heads = base_config.get("num_attention_heads", base_config.get("n_head")) or 1
            # keys and values are as wide as the hidden state, or narrower under grouped-query attention
            widths = {hidden, hidden // heads * (base_config.get("num_key_value_heads") or heads)}
            if layers != base_layers or width not in widths:
                problems[key] = (f"the prefixes are for {layers} layers of width {width}, the base has {base_layers} "
                                 f"layers of width {' or '.join(map(str, sorted(widths)))}")
            matched += 1
        elif not _HEAD_TENSOR.match(key):
            problems[key] = f"tensor {key!r} is neither an adapter weight nor a task head"
    if not matched and not problems:
        problems["-"] = "no adapter weight names a layer of the base"
    return list(problems.values())
