"""YAML recipes, validated with pydantic: base, task, adapter (or freeze), training, domains.

Errors name the recipe file and the key path (`training.learning_rate`), say what was expected and
what was found. Relative data paths are read from the recipe's folder; `${PEFT_ADAPT_DATA}` expands
to the shared data folder (see `data_root`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .backbone import BaseSpec
from .data import TaskSpec
from .errors import UserInputError
from .freeze import FREEZE_PATTERN
from .methods import SPECS, AdapterSpec, LoraSpec
from .objectives import DomainAdaptationSpec


class EarlyStoppingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str = "eval_loss"
    patience: int = Field(3, ge=1)
    threshold: float = Field(0.0, ge=0)


class TrainingSpec(BaseModel):
    """The `training:` section."""

    model_config = ConfigDict(extra="forbid")
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    gradient_checkpointing: bool = False
    seed: int = 42
    eval_steps: int | None = Field(None, ge=1)  # None: evaluate once per epoch (or at the end with max_steps)
    logging_steps: int = Field(10, ge=1)
    early_stopping: EarlyStoppingSpec | None = None
    max_train_rows: int | None = Field(None, ge=1)
    max_eval_rows: int | None = Field(None, ge=1)


class DomainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: str
    eval: str | None = None
    test: str | None = None


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    base: BaseSpec
    task: TaskSpec
    adapter: AdapterSpec | None = None
    freeze: str | None = None
    training: TrainingSpec = TrainingSpec()
    domain_adaptation: DomainAdaptationSpec | None = None
    domains: dict[str, DomainSpec] = Field(min_length=1)
    _source: Path | None = PrivateAttr(None)  # the file it was read from

    @field_validator("domains", mode="before")
    @classmethod
    def _train_file_shorthand(cls, value):
        """`books: data/books.jsonl` is short for `books: {train: data/books.jsonl}`."""
        if isinstance(value, dict):
            return {k: {"train": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @property
    def source(self) -> Path | None:
        return self._source

    @model_validator(mode="after")
    def _adapter_or_freeze(self):
        if self.freeze is not None:
            if not FREEZE_PATTERN.match(self.freeze):
                raise ValueError(f"freeze: {self.freeze!r} is not known; use all (head only), none (full fine-tune) or bottom:N")
            if self.adapter is not None:
                raise ValueError("give either adapter: (train an adapter) or freeze: (a classic baseline), not both")
            if self.freeze == "all" and self.task.type == "causal_lm":
                raise ValueError("freeze: all trains the task head only, which exists for classification; use an adapter for causal_lm")
            if self.freeze != "all" and self.base.quantization != "none":
                raise ValueError(f"freeze: {self.freeze} trains backbone weights, which a {self.base.quantization} base cannot; set base.quantization: none")
        elif self.adapter is None:
            self.adapter = LoraSpec()
        for name in self.domains:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"domain name {name!r}: use letters, digits, '_', '.', '-' (it names a folder)")
        return self

    @property
    def method(self) -> str:
        return self.adapter.method if self.adapter is not None else _freeze_method(self.freeze)

    def domain(self, name: str) -> DomainSpec:
        if name not in self.domains:
            raise UserInputError(f"{self.source or 'recipe'}: no domain {name!r}; the recipe has {sorted(self.domains)}")
        return self.domains[name]

    def data_path(self, value: str) -> Path:
        """A data path from the recipe: ${VARS} expanded, relative paths from the recipe's folder."""
        expanded = _expand(value)
        path = Path(expanded).expanduser()
        if not path.is_absolute() and self.source is not None:
            path = self.source.parent / path
        return path


def _freeze_method(freeze: str) -> str:
    return {"all": "head_only", "none": "full"}.get(freeze, f"partial_{freeze.replace(':', '')}")


def data_root() -> Path:
    """The shared evaluation data: $PEFT_ADAPT_DATA, else ../shared/data from the current folder or the project."""
    if os.environ.get("PEFT_ADAPT_DATA"):
        return Path(os.environ["PEFT_ADAPT_DATA"])
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = (base / ".." / "shared" / "data").resolve()
        if candidate.is_dir():
            return candidate
    return (Path.cwd() / ".." / "shared" / "data").resolve()


def _expand(value: str) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name == "PEFT_ADAPT_DATA":
            return str(data_root())
        if name not in os.environ:
            raise UserInputError(f"data path {value!r}: environment variable ${{{name}}} is not set")
        return os.environ[name]

    return re.sub(r"\$\{(\w+)\}", replace, value)


def _section_model(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model of the section that holds the key at `loc` (to list its known keys)."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if part in SPECS:  # the tag of the adapter union: the section is that method's spec
            model = SPECS[part]
            continue
        if model is None:
            return None
        field = model.model_fields.get(str(part))
        if field is None:  # a dict key (domain name) or a union tag: step through to the models below
            continue
        candidates = [a for a in getattr(field.annotation, "__args__", ()) + (field.annotation,)
                      if isinstance(a, type) and issubclass(a, BaseModel)]
        model = candidates[0] if candidates else None
    return model


def _format_error(error: dict) -> str:
    where = ".".join(str(p) for i, p in enumerate(error["loc"]) if not (i == 1 and p in SPECS)) or "(top level)"
    if error["type"] == "extra_forbidden":
        section = _section_model(error["loc"])
        known = f"; known keys here: {', '.join(section.model_fields)}" if section else ""
        return f"{where}: unknown key{known}"
    found = error.get("input")
    shown = "" if isinstance(found, dict) or error["type"] == "missing" else f" (found {found!r})"
    return f"{where}: {error['msg']}{shown}"


def parse_recipe(data: dict, source: str | Path | None = None) -> Recipe:
    label = str(source) if source else "recipe"
    if not isinstance(data, dict):
        raise UserInputError(f"{label}: expected a mapping of sections (base, task, adapter, training, domains)")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        lines = "\n  ".join(_format_error(e) for e in exc.errors())
        raise UserInputError(f"{label}: invalid recipe:\n  {lines}") from None
    recipe._source = Path(source).resolve() if source else None
    return recipe


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`key.path=value` overrides (value parsed as YAML; `null` removes the key), as from `--set`."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"--set {item!r}: expected KEY.PATH=VALUE, for instance training.max_steps=10")
        value = yaml.safe_load(raw) if raw else None
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserInputError(f"{path}: not valid YAML: {exc}") from None
    if overrides and isinstance(data, dict):
        data = apply_overrides(data, overrides)
    return parse_recipe(data, path)
