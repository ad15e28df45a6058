"""The on-disk contract, read and written in this one module: the manifest, the adapter configs, the checks a folder
passes before anything trusts it, and the one atomic folder writer.

An adapter folder holds an adapter config (peft's `adapter_config.json`, or our own `<method>_config.json` for
methods peft lacks), safetensors weights, `manifest.json`, and what travels with them (EXTRA_FILES). It is
accepted when its config parses, every weight file is complete, and every checksum in the manifest matches.
Pickle weights are refused unless the caller passes `allow_pickle=True`; then they are read as tensors only
and converted to safetensors on the way in.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .builtin_models import sha256_file
from .errors import UserInputError
from .faults import crash_point
from .fingerprint import layer_pattern, read_safetensors_header
from .model_files import BaseSpec

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
ADAPTER_CONFIG = "adapter_config.json"  # peft's
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")
TRAINED_WEIGHTS = "trained_weights.safetensors"  # what a freezing baseline saves instead of an adapter
OWN_CONFIG_SUFFIX = "_config.json"  # our own formats: `<method>_config.json` with a `method` key
# files that travel with an adapter besides its configs and weights (each checksummed in the manifest);
# anything else in a folder is left behind
EXTRA_FILES = ("metrics.json", "log_history.json", "loss_curve.png", "README.md", "signature.safetensors")
SIGNATURE_FILE = "signature.safetensors"  # routing's domain signature (routing.py): not a weight file
# peft types whose method is not simply the lower-cased type
PEFT_METHOD_NAMES = {"PREFIX_TUNING": "prefix"}


# ---------------------------------------------------------------- JSON


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: corrupt JSON ({exc.msg} at line {exc.lineno})") from None


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


# ---------------------------------------------------------------- the manifest


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


# ---------------------------------------------------------------- adapter configs


@dataclass(frozen=True)
class AdapterConfig:
    """An adapter folder's config, read once: peft's `adapter_config.json`, or our own `<method>_config.json`."""

    file: str
    data: dict

    @property
    def is_peft(self) -> bool:
        return self.file == ADAPTER_CONFIG

    @property
    def peft_type(self) -> str | None:
        return str(self.data["peft_type"]).upper() if self.is_peft else None

    @property
    def method(self) -> str:
        if not self.is_peft:
            return str(self.data["method"])
        return PEFT_METHOD_NAMES.get(self.peft_type, self.peft_type.lower())

    @property
    def task_type(self) -> str | None:
        return self.data.get("task_type")

    @property
    def lora_scale(self) -> float:
        """The factor on B @ A, computed in this one place: alpha / r, or alpha / sqrt(r) under rsLoRA."""
        alpha, rank = float(self.data["lora_alpha"]), int(self.data["r"])
        return alpha / rank ** 0.5 if self.data.get("use_rslora") else alpha / rank

    @property
    def dora(self) -> bool:
        return bool(self.data.get("use_dora"))


def own_config_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob(f"*{OWN_CONFIG_SUFFIX}") if p.name != ADAPTER_CONFIG)


def folder_kind(folder: Path) -> str:
    """`adapter` (a config beside its weights) or `trained_weights` (a freezing baseline)."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).is_file() or own_config_files(folder):
        return "adapter"
    if (folder / TRAINED_WEIGHTS).is_file():
        return "trained_weights"
    raise UserInputError(
        f"{folder}: missing {ADAPTER_CONFIG}; an adapter folder needs its config beside its weights "
        f"({ADAPTER_CONFIG} for peft methods, <method>{OWN_CONFIG_SUFFIX} for ours)"
    )


def read_adapter_config(folder: Path) -> AdapterConfig:
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if path.is_file():
        data = read_json(path)
        if not isinstance(data, dict) or "peft_type" not in data:
            raise UserInputError(f"{path}: not a peft adapter config (no peft_type)")
        return AdapterConfig(ADAPTER_CONFIG, data)
    for own in own_config_files(folder):
        data = read_json(own)
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            return AdapterConfig(own.name, data)
        raise UserInputError(f"{own}: not an adapter config (a `method` key is required)")
    raise UserInputError(
        f"{folder}: missing {ADAPTER_CONFIG}; an adapter folder needs its config beside its weights "
        f"(save it with model.save_pretrained(folder))"
    )


# ---------------------------------------------------------------- the files of a folder


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file in an adapter folder but the manifest itself: weights, configs and what travels with them."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).iterdir())
            if p.is_file() and not p.is_symlink() and p.name != MANIFEST and not p.name.startswith(".")}


def is_adapter_file(name: str) -> bool:
    return (name == ADAPTER_CONFIG or name.endswith(OWN_CONFIG_SUFFIX) or name in EXTRA_FILES
            or name in PICKLE_WEIGHTS or name.endswith(".safetensors"))


def adapter_files_to_copy(folder: Path) -> list[Path]:
    """The files of an adapter folder that belong in a registry: configs, weights (safetensors, or pickle for the
    caller to convert) and EXTRA_FILES. A symbolic link or special file among them is refused: copying it would
    read whatever it points at (a `notes.txt -> /etc/shadow` link would land in the registry)."""
    chosen = []
    for path in sorted(Path(folder).iterdir()):
        if not is_adapter_file(path.name) or path.name.startswith("."):
            continue
        if path.is_symlink() or not path.is_file():
            kind = "a symbolic link" if path.is_symlink() else "not a regular file"
            raise UserInputError(f"{path} is {kind}; an adapter folder must hold plain files only. Copy the real file "
                                 f"in its place")
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


# ---------------------------------------------------------------- does an adapter fit a base?

_LORA_TENSOR = re.compile(r"^(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_HEAD_TENSOR = re.compile(r"^(?:.+\.)?(classifier|score|lm_head)(?:\.(?:modules_to_save|original_module)\.[^.]+)?\.(weight|bias)$")
_MLM_HEAD_TENSOR = re.compile(r"(?:^|\.)mlm_head\.")  # a domain adapter's masked-LM head (dense, norm, bias)
_WRAPPERS = ("base_model.model.",)


def base_module_shape(module_path: str, module_shapes: dict[str, dict]) -> list[int] | None:
    """[out, in] of the base layer an adapter names, matched by its longest known suffix: an adapter's path
    carries wrappers' prefixes (`base_model.model.`, our classifier's `encoder.`) the checkpoint does not."""
    parts = layer_pattern(module_path).split(".")
    for start in range(len(parts) - 1):
        suffix = ".".join(parts[start:])
        for pattern, entry in module_shapes.items():
            if pattern == suffix or pattern.endswith("." + suffix):
                return entry["shape"]
    return None


def _owning_layer(key: str, module_shapes: dict[str, dict]) -> tuple[str, list[int]] | None:
    """The longest leading part of a tensor's name that is a layer of the base, and that layer's [out, in]."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:end])
        shape = base_module_shape(path, module_shapes)
        if shape is not None:
            return path, shape
    return None


def adapter_fit_problems(shapes: dict[str, list[int]], fingerprint: dict, base_config: dict,
                         adapter_config: AdapterConfig | None) -> list[str]:
    """Why an adapter's tensors do not fit a base (empty when they do). LoRA matrices are checked exactly (A takes
    the layer's inputs, B gives its outputs); a prefix must match the layers and their width; any other adapter
    tensor must hang off a layer of the base and share one of its sizes. Heads are the adapter's own."""
    problems: dict[str, str] = {}  # one line per layer, however many of its tensors disagree
    modules = fingerprint["module_shapes"]
    matched = 0
    attached: dict[tuple[str, str], list] = {}  # (layer, part) -> [layer's shape, any tensor sharing a size with it]
    for key, shape in sorted(shapes.items()):
        bare = next((key[len(w):] for w in _WRAPPERS if key.startswith(w)), key)
        if _HEAD_TENSOR.match(key) or _MLM_HEAD_TENSOR.search(key):
            continue
        matched += 1
        if m := _LORA_TENSOR.match(bare):
            path, which = m.group(1), m.group(2)
            base = base_module_shape(path, modules)
            if base is None:
                problems.setdefault(path, f"{path} is not a layer of the base")
            elif which == "A" and shape[-1] != base[1]:
                problems.setdefault(path, f"{path}: lora_A takes {shape[-1]} inputs, the base layer has {base[1]}")
            elif which == "B" and shape[0] != base[0]:
                problems.setdefault(path, f"{path}: lora_B gives {shape[0]} outputs, the base layer has {base[0]}")
        elif bare == "prompt_embeddings" and adapter_config is not None:
            problem = _prefix_problem(adapter_config.data, base_config)
            if problem:
                problems[bare] = problem
        else:
            owner = _owning_layer(bare, modules)
            if owner is None:
                problems.setdefault(bare, f"tensor {key!r} names no layer of the base")
                continue
            # a tensor hung on the layer (ia3_l), or one of a module inserted there (adapter.down): some tensor of
            # each must share a size with the layer
            part = bare[len(owner[0]) + 1:].split(".")[0]
            group = attached.setdefault((owner[0], part), [owner[1], False])
            group[1] = group[1] or bool(set(s for s in shape if s > 1) & set(owner[1])) or all(s <= 1 for s in shape)
    for (layer, part), (layer_shape, fits) in attached.items():
        if not fits:
            problems.setdefault(layer, f"{layer}: the adapter's {part} shares no size with the base layer {layer_shape}")
    if not matched and not problems:
        problems["-"] = "no adapter weight names a layer of the base"
    return list(problems.values())


def _prefix_problem(config: dict, base_config: dict) -> str | None:
    layers, width = config.get("num_layers"), config.get("token_dim")
    base_layers = base_config.get("num_hidden_layers", base_config.get("n_layer"))
    hidden = base_config.get("hidden_size", base_config.get("n_embd")) or 0
    heads = base_config.get("num_attention_heads", base_config.get("n_head")) or 1
    # keys and values are as wide as the hidden state, or narrower under grouped-query attention
    widths = {hidden, hidden // heads * (base_config.get("num_key_value_heads") or heads)}
    if layers != base_layers or width not in widths:
        return (f"the prefixes are for {layers} layers of width {width}, the base has {base_layers} layers of "
                f"width {' or '.join(map(str, sorted(widths)))}")
    return None


# ---------------------------------------------------------------- writing a folder whole


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
