"""A checkpoint read one tensor at a time, and a model written one tensor at a time into safetensors shards.

Memory stays bounded by the tensor in hand, whatever the model's size: every shard is checked (present, its header
whole, its length what the header says) before anything is written; a tensor is read by opening its file for that
tensor only (no mapping outlives it); and the writer lays out every shard's header from shapes alone, so each
tensor's bytes go to disk as soon as they exist. `safetensors.torch.save_file` would hold a whole shard.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserInputError
from .fingerprint import read_safetensors_header

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
# safetensors' dtype names (its format's spec)
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
NAMED_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class Checkpoint:
    """A model folder's safetensors weights: names, shapes and dtypes from the headers; tensors on demand."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise UserInputError(f"{index} is not a safetensors index ({e}); download the model again") from None
        elif (self.folder / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise UserInputError(f"{self.folder} holds no {SINGLE} or {INDEX}: export reads safetensors checkpoints. "
                                 f"Convert a pickled one with transformers' save_pretrained(safe_serialization=True)")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            for key, info in _read_header(self.folder / name).items():
                self.tensors[key] = info

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    @property
    def float_dtype(self) -> torch.dtype | None:
        """The floating dtype holding most of the checkpoint's bytes (what it was saved in)."""
        sizes: dict[torch.dtype, int] = {}
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                sizes[info.dtype] = sizes.get(info.dtype, 0) + _nbytes(info.shape, info.dtype)
        return max(sizes, key=sizes.get) if sizes else None

    def read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.tensors[key].file, "pt") as handle:
            return handle.get_tensor(key)


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """Shapes and dtypes of one shard, after checking the file is all there."""
    fix = "download or copy the model again"
    if not path.is_file():
        raise UserInputError(f"checkpoint shard {path} is missing (the index names it); {fix}")
    size = path.stat().st_size
    try:
        header, start = read_safetensors_header(path)
        infos = {k: TensorInfo(path, tuple(v["shape"]), NAMED_DTYPES[v["dtype"]]) for k, v in header.items()}
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
    except (UserInputError, KeyError, TypeError, AttributeError) as e:
        raise UserInputError(f"checkpoint shard {path} is not a whole safetensors file ({e}); {fix}") from None
    if start + end != size:
        raise UserInputError(f"checkpoint shard {path} is {size} bytes where its header says {start + end} "
                             f"(truncated or corrupt); {fix}")
    return infos


class ShardWriter:
    """Safetensors shards planned from (name, shape, dtype) alone, filled one tensor at a time in plan order."""

    def __init__(self, folder: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.folder = Path(folder)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for item in plan:
            nbytes = _nbytes(item[1], item[2])
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += nbytes
        count = len(shards)
        names = [SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.shards = list(zip(names, shards))
        self.total_size = sum(_nbytes(shape, dtype) for _, shape, dtype in plan)
        self._pending = iter([(name, item) for name, items in self.shards for item in items])
        self._file = None
        self._file_name = None

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """The next tensor of the plan (its name, shape and dtype must be the plan's)."""
        name, (expected, shape, dtype) = next(self._pending)
        if (key, tuple(tensor.shape), tensor.dtype) != (expected, tuple(shape), dtype):
            raise RuntimeError(f"wrote {key} {tuple(tensor.shape)} {tensor.dtype} where the plan has {expected} "
                               f"{tuple(shape)} {dtype}")
        if name != self._file_name:
            self._open(name)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))

    def close(self) -> None:
        """Finish the last shard and write the index (several shards) beside them."""
        if next(self._pending, None) is not None:
            raise RuntimeError("the model was written only in part")
        if self._file is not None:
            self._file.close()
        if len(self.shards) > 1:
            weight_map = {key: name for name, items in self.shards for key, _, _ in items}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def _open(self, name: str) -> None:
        if self._file is not None:
            self._file.close()
        items = dict(self.shards)[name]
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape, dtype in items:
            nbytes = _nbytes(shape, dtype)
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the tensors start 8-byte aligned, as safetensors writes them
        self._file = (self.folder / name).open("wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._file_name = name


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for n in shape:
        count *= n
    return count * torch.empty((), dtype=dtype).element_size()


def parse_size(text: str | int) -> int:
    """`2GB`, `500MB`, `1GiB` or a number of bytes."""
    if isinstance(text, int):
        return text
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise UserInputError(f"shard size {text!r}: give bytes or a size such as 2GB or 500MB")
