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

from ..adaptation import TABLE as ADAPTATION_METHODS
from ..adaptation.spec import DomainAdaptationSpec
from ..data import TaskSpec, read_utf8
from ..errors import UserInputError
from ..methods import DEFAULT, SPECS, AdapterSpec, method
from ..models.backbone import BaseSpec
from ..registry.refs import NAME_RE
from .freeze import FREEZE_PATTERN


class EarlyStoppingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str = Field("eval_loss", description="eval_loss, accuracy, macro_f1, f1, perplexity")
    patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    threshold: float = Field(0.0, ge=0)


class TrainingSpec(BaseModel):
    """The `training:` section."""

    model_config = ConfigDict(extra="forbid")
    epochs: float = Field(1.0, gt=0, description="or max_steps")
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1, description="per process")
    eval_batch_size: int | None = Field(None, ge=1, description="default: batch_size")
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0, description="instead of warmup_ratio")
    weight_decay: float = Field(0.0, ge=0)
    gradient_checkpointing: bool = False
    seed: int = 42
    eval_steps: int | None = Field(None, ge=1, description="default: evaluate once per epoch (or at the end with max_steps)")
    logging_steps: int = Field(10, ge=1)
    early_stopping: EarlyStoppingSpec | None = Field(None, description="e.g. {metric: accuracy, patience: 3}")
    max_train_rows: int | None = Field(None, ge=1, description="subsample for quick runs")
    shots: int | None = Field(None, ge=1, description="few-shot: exactly K training rows per class, drawn with the seed")
    max_eval_rows: int | None = Field(None, ge=1)
    checkpoint_steps: int | None = Field(
        100, ge=1, description="save a checkpoint this often, for `train --resume`; null: never (early stopping saves its own)")
    threads: int | Literal["auto"] = Field("auto", description="CPU threads per process; auto: the cores shared by the processes")
    report_to: list[str] = Field([], description="experiment trackers, e.g. [tensorboard]; logs in <out>/logs/<domain>")
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto", description="liger: liger-kernel's fused RMSNorm, RoPE, SwiGLU and cross-entropy (CUDA, the model "
                            "types liger patches); auto: liger where it applies and is installed; none: plain PyTorch")

    @field_validator("threads")
    @classmethod
    def _at_least_one_thread(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("threads must be at least 1, or auto")
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_or_many(cls, value):
        if value in (None, "none"):
            return []
        return [value] if isinstance(value, str) else value


class DomainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: str = Field(json_schema_extra={"example": "${PEFT_ADAPT_DATA}/amazon_multidomain/books.train.jsonl"})
    eval: str | None = Field(None, description="default: carved from train (task.eval_fraction)")
    test: str | None = Field(None, description="scored once at the end")


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, description="names the adapters <name>-<domain>")
    base: BaseSpec
    task: TaskSpec
    adapter: AdapterSpec | None = None
    freeze: str | None = Field(None, description="instead of adapter: all (head only) | none (full fine-tune) | bottom:N")
    training: TrainingSpec = TrainingSpec()
    domain_adaptation: DomainAdaptationSpec | None = Field(
        None, description="optional: align with a target domain's unlabeled text")
    stack_on: str | None = Field(
        None, description="a registered LoRA domain adapter (e.g. books-domain) to train this LoRA on top of, frozen")
    init_from: str | None = Field(
        None, description="start the adapter from a registered one of the same base, method and shape (e.g. a "
                          "meta-learned initialisation) instead of fresh")
    domains: dict[str, DomainSpec] = Field(min_length=1, description="name -> train file, or {train, eval, test}")
    _source: Path | None = PrivateAttr(None)  # the file it was read from

    @field_validator("domains", mode="before")
    @classmethod
    def _train_file_shorthand(cls, value):
        """`books: data/books.jsonl` is short for `books: {train: data/books.jsonl}`."""
        if isinstance(value, dict):
            return {k: {"train": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value):
        """The name becomes adapter names and the default output folder: a plain word, never a path."""
        if value is not None and (not NAME_RE.fullmatch(value) or ".." in value):
            raise ValueError(f"name {value!r}: use letters, digits, '_', '.' or '-', starting with a letter or digit "
                             f"(it names the adapters <name>-<domain> and the folder runs/<name>)")
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
            self.adapter = SPECS[DEFAULT]()
        adapting = method(self.method) if self.adapter is not None else None
        if self.init_from is not None and self.adapter is None:
            raise ValueError("init_from starts an adapter; this recipe trains no adapter (freeze:): remove init_from")
        if self.stack_on is not None and not (adapting and adapting.stackable):
            raise ValueError(f"stack_on stacks LoRA adapters (their deltas add); this recipe trains {self.method}: "
                             f"use adapter.method: lora, or remove stack_on")
        if self.task.type == "masked_lm" and not (adapting and "masked_lm" in adapting.tasks):
            raise ValueError(f"task masked_lm trains a domain adapter (lora, bottleneck or ia3), not {self.method}")
        if self.task.type == "seq2seq" and not (adapting and "seq2seq" in adapting.tasks):
            raise ValueError(f"task seq2seq trains lora or ia3 on an encoder-decoder, not "
                             f"{self.method if adapting else 'without an adapter'}")
        if self.task.type == "seq2seq" and (self.stack_on is not None or self.domain_adaptation is not None):
            raise ValueError("task seq2seq trains one adapter on input/target pairs: remove stack_on and "
                             "domain_adaptation")
        adaptation = self.domain_adaptation
        if adaptation is not None and self.task.type == "masked_lm":
            raise ValueError("domain_adaptation aligns a task's features across domains; task masked_lm has no task: "
                             "remove domain_adaptation")
        chosen = ADAPTATION_METHODS[adaptation.method] if adaptation is not None else None
        if chosen is not None and self.task.type not in chosen.tasks:
            fitting = [n for n, m in ADAPTATION_METHODS.items() if self.task.type in m.tasks and m.aligns]
            raise ValueError(f"domain_adaptation.method {adaptation.method} {chosen.purpose}; this recipe's task is "
                             f"{self.task.type}: use {', '.join(fitting)}")
        if adaptation is not None and adaptation.self_training is not None and self.task.type != "classification":
            raise ValueError(f"domain_adaptation.self_training labels whole texts, for task classification; this recipe's "
                             f"task is {self.task.type}: remove self_training or use method dann, coral or mmd")
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


# ---------------------------------------------------------------- the reference README shows

COMMENT_COLUMN = 33


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()


def _describe(field) -> str:
    """The field's description; for a Literal, the choices first unless the description names them."""
    from typing import get_args, get_origin

    text = field.description or ""
    choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else ()
    if choices and " | ".join(map(str, choices)) not in text and "|" not in text:
        text = " | ".join(map(str, choices)) + (f"; {text}" if text else "")
    return text


def _field_line(indent: int, key: str, value, comment: str, commented: bool = False) -> str:
    text = f"{'  ' * indent}{key}:" + (f" {value}" if value != "" else "")
    if commented:
        text = "# " + text
    return f"{text.ljust(COMMENT_COLUMN - 2)}  # {comment}" if comment else text


def _example(field):
    """A required field's example: its own, or the one value a one-choice Literal allows (a method's tag)."""
    from typing import get_args, get_origin

    if isinstance(field.json_schema_extra, dict) and "example" in field.json_schema_extra:
        return field.json_schema_extra["example"]
    choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else ()
    return choices[0] if len(choices) == 1 else None


def _header(indent: int, key: str, comment: str, commented: bool = False) -> str:
    return _field_line(indent, key, "", comment, commented)


def _inline(model: type[BaseModel]) -> str:
    """A section on one line: `{key: default, ...}`, required keys with their example."""
    parts = []
    for key, field in model.model_fields.items():
        value = field.get_default(call_default_factory=True) if not field.is_required() else _example(field)
        parts.append(f"{key}: {_yaml_value(value)}")
    return "{" + ", ".join(parts) + "}"


def _section(model: type[BaseModel], indent: int, lines: list[str], commented: bool = False,
             comments: dict[str, str] | None = None) -> None:
    for key, field in model.model_fields.items():
        nested = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
        if nested is not None and field.is_required():
            lines.append(_header(indent, key, _describe(field), commented))
            _section(nested, indent + 1, lines, commented)
            continue
        value = _example(field) if field.is_required() else field.get_default(call_default_factory=True)
        lines.append(_field_line(indent, key, _yaml_value(value), (comments or {}).get(key, _describe(field)), commented))


def recipe_reference() -> str:
    """Every recipe key with its default (or, for required keys, an example) and what it means, generated
    from the pydantic models so the README cannot drift from the code."""

    lines: list[str] = []
    fields = Recipe.model_fields
    lines.append(_field_line(0, "name", "null", _describe(fields["name"])))
    for key, model in (("base", BaseSpec), ("task", TaskSpec)):
        lines.append(f"{key}:")
        _section(model, 1, lines)
    lines.append(_header(0, "adapter", "or freeze: (below), not both"))
    _section(SPECS[DEFAULT], 1, lines, comments={"method": " | ".join(SPECS)})
    for name, spec in SPECS.items():
        if name != DEFAULT:
            lines.append(f"# adapter: {_inline(spec)}")
    lines.append(_field_line(0, "freeze", "null", _describe(fields["freeze"]), commented=True))
    lines.append("training:")
    for key, field in TrainingSpec.model_fields.items():
        value = field.get_default(call_default_factory=True)
        lines.append(_field_line(1, key, _yaml_value(value), _describe(field)))
    lines.append(_header(0, "domain_adaptation", _describe(fields["domain_adaptation"]), commented=True))
    _section(DomainAdaptationSpec, 1, lines, commented=True)
    lines.append(_field_line(0, "stack_on", "null", _describe(fields["stack_on"]), commented=True))
    lines.append(_field_line(0, "init_from", "null", _describe(fields["init_from"]), commented=True))
    lines.append(_header(0, "domains", _describe(fields["domains"])))
    lines.append("  books:")
    _section(DomainSpec, 2, lines)
    return "\n".join(lines) + "\n"


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


MAX_RECIPE_BYTES = 1_000_000
MAX_RECIPE_VALUES = 100_000  # values with every alias expanded: a recipe has hundreds; an alias bomb, billions


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a document that stands for too many values once its aliases are expanded: a few
    lines of nested aliases (a "billion laughs") load as a small shared graph, and whatever walks it as a tree
    (validation, an error message showing the value) hung the process for minutes and 4 GB before it was killed."""

    def compose_document(self):
        root = super().compose_document()
        sizes: dict[int, int] = {}

        def expanded(node) -> int:  # each shared node counted as often as it is referenced, computed once
            if id(node) not in sizes:
                children = node.value if isinstance(node, yaml.SequenceNode) else (
                    [v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode) else [])
                sizes[id(node)] = 1 + sum(expanded(child) for child in children)
            return sizes[id(node)]

        if root is not None and expanded(root) > MAX_RECIPE_VALUES:
            raise yaml.YAMLError(f"the document stands for {expanded(root):,} values once its aliases (*name) are "
                                 f"expanded, more than {MAX_RECIPE_VALUES:,}; write the values out instead")
        return root


def load_yaml(text: str):
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader that bounds alias expansion)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`key.path=value` overrides (value parsed as YAML; `null` removes the key), as from `--set`."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"--set {item!r}: expected KEY.PATH=VALUE, for instance training.max_steps=10")
        try:
            value = load_yaml(raw) if raw else None
        except yaml.YAMLError as exc:
            raise UserInputError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
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

    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise UserInputError(f"recipe {path} is {path.stat().st_size} bytes; a recipe is at most {MAX_RECIPE_BYTES} "
                             f"(data goes in the files its domains name)")
    try:
        data = load_yaml(read_utf8(path))
    except yaml.YAMLError as exc:
        raise UserInputError(f"{path}: not valid YAML: {exc}") from None
    if overrides and isinstance(data, dict):
        data = apply_overrides(data, overrides)
    return parse_recipe(data, path)


if __name__ == "__main__":  # `python -m peft_adapt.training.recipe` prints the reference the README shows
    print(recipe_reference(), end="")
