"""An adapter folder's config: peft's `adapter_config.json` or our own `<method>_config.json`, read in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError
from .names import ADAPTER_CONFIG, OWN_CONFIG_SUFFIX, PEFT_METHOD_NAMES, TRAINED_WEIGHTS, read_json


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
