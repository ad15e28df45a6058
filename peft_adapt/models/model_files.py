"""What a base model is and where its files are, without loading it: the recipe's `base:` section (`BaseSpec`)
and the resolution of a name (a built-in alias, a local folder, or a Hugging Face hub id) to a local folder.

Kept apart from model loading (`backbone.py`) so that storage (the registry, the typed formats) can name and
fingerprint a base without importing torch or transformers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import UserInputError
from .builtin_models import BUILTIN_MODELS, builtin_model_path, gguf_model_folder

Quantization = Literal["none", "int8", "nf4", "fp4"]
QUANTIZATIONS = ("none", "int8", "nf4", "fp4")


class BaseSpec(BaseModel):
    """The `base:` section of a recipe."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="built-in alias, local folder, or hub id (needs the network)",
                       json_schema_extra={"example": "minilm-l6"})
    quantization: Quantization = "nf4"
    double_quant: bool = Field(True, description="4-bit: quantize the quantization constants too")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")
    # the dtype 4-bit weights are packed into; FSDP shards only floating tensors, so FSDP + QLoRA needs
    # bfloat16 (matching the other parameters' dtype)
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field("uint8", description="bfloat16 for FSDP + QLoRA")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    trust_remote_code: bool = Field(False, description="run Python code shipped with the model (only if you trust it)")
    allow_pickle: bool = Field(False, description="accept .bin / .pt weights, which can run code when loaded")


def resolve_model_path(name: str, allow_pickle: bool = False) -> Path:
    """A local folder holding config.json and weights for `name`."""
    if name in BUILTIN_MODELS:
        return builtin_model_path(name)
    local = Path(name).expanduser()
    if local.is_file() and local.suffix == ".gguf":  # a llama.cpp model file: converted once into a cached folder
        return gguf_model_folder(local)
    if local.exists():
        folder = local
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserInputError(
            f"model {name!r} resolves nowhere: it is not a local folder, not a built-in alias "
            f"({', '.join(BUILTIN_MODELS)}) and not a Hugging Face hub id of the form owner/name."
        )
    else:
        folder = _download_from_hub(name)
    if not (folder / "config.json").is_file():
        raise UserInputError(f"model {name!r}: {folder} has no config.json; expected a Hugging Face model folder")
    has_safetensors = any(folder.glob("*.safetensors"))
    if not has_safetensors:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        if not pickled:
            raise UserInputError(f"model {name!r}: {folder} has no weight files (*.safetensors)")
        if not allow_pickle:
            raise UserInputError(
                f"model {name!r}: {folder} has only pickle weights ({', '.join(pickled)}), which can run "
                f"code when loaded. Convert them to safetensors, or set base.allow_pickle: true if you "
                f"trust the source."
            )
    return folder


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except Exception as exc:  # offline, unknown repo, gated repo: all mean "not available here"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise UserInputError(
            f"model {repo_id!r} resolves nowhere: not a local folder, not a built-in alias "
            f"({', '.join(BUILTIN_MODELS)}), and the Hugging Face hub could not provide it"
            f"{' (HF_HUB_OFFLINE=1)' if offline else ''}: {type(exc).__name__}. Use a local folder or a built-in alias."
        ) from None
