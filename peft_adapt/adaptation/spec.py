"""The recipe's `domain_adaptation:` section, built from the table: the common keys, then one optional nested
section per method that has settings (`dann: {gamma, adversary, hidden}`). Recipes written with the flat keys of
before (`dann_gamma`, `adda_steps`, `generator`) are still read, with a one-line notice."""

from __future__ import annotations

import logging
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from . import TABLE
from .self_training import SelfTrainingSpec

log = logging.getLogger(__name__)

# the flat keys of earlier recipes -> (method section, key there); `dann_hidden` sized ADDA's discriminator too
FLAT_KEYS = {"dann_gamma": ("dann", "gamma"), "dann_adversary": ("dann", "adversary"), "dann_hidden": ("dann", "hidden"),
             "adda_steps": ("adda", "steps"), "adda_learning_rate": ("adda", "learning_rate"),
             "adda_source_weight": ("adda", "source_weight")}


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal[tuple(TABLE)] = Field(
        json_schema_extra={"example": "dann"},
        description="the alignment term; adda / generate: a target adapter of its own; none: self-training alone")
    target: str = Field(description="unlabeled target-domain text (its labels are never read)",
                        json_schema_extra={"example": "${PEFT_ADAPT_DATA}/amazon_multidomain/kitchen.train.jsonl"})
    weight: float = Field(1.0, ge=0, description="coral / mmd / entropy: x the term; dann: x the adversary's strength")
    max_target_rows: int | None = Field(None, ge=1)
    safeguard: bool = Field(
        True, description="classification: train the source-only adapter too and keep the adapted one only when "
                          "label-free criteria (DEV risk, source accuracy, target class shares) say it is better")
    source_only: Optional[str] = Field(
        None, description="the safeguard: judge against this registered adapter (same base, method, shape and labels; "
                          "e.g. kitchen, trained without domain_adaptation) instead of training source-only again")
    select: Optional[Literal["auto"]] = Field(
        None, description="auto: also train the term's weight x0.1 and x10 (and other self-training thresholds) and "
                          "keep whichever the safeguard's criteria rank best, source-only included")
    self_training: SelfTrainingSpec | None = Field(
        None, description="classification: also learn the adapter's confident labels of the target, "
                          "e.g. {rounds: 2, threshold: 0.9, balance: true, weight: 1.0}")

    @model_validator(mode="before")
    @classmethod
    def _migrate_flat_keys(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        moved = []
        if "generator" in data:
            data["generate"] = data.pop("generator")
            moved.append("generator -> generate")
        for key in [k for k in FLAT_KEYS if k in data]:
            section, inner = FLAT_KEYS[key]
            if key == "dann_hidden" and data.get("method") == "adda":
                section = "adda"
            data.setdefault(section, {})
            if isinstance(data[section], dict):
                data[section] = {inner: data.pop(key)} | data[section]
            moved.append(f"{key} -> {section}.{inner}")
        if moved:
            log.warning("domain_adaptation: read the earlier flat keys as nested sections (%s); write them nested",
                        ", ".join(moved))
        return data

    @model_validator(mode="after")
    def _does_something(self):
        chosen = TABLE[self.method]
        if not chosen.aligns and self.self_training is None:
            raise ValueError(f"method {self.method} aligns nothing: add self_training: {{rounds: 2, threshold: 0.9}} "
                             f"or name one of {', '.join(m for m in TABLE if TABLE[m].aligns)}")
        if self.source_only is not None and not self.safeguard:
            raise ValueError("source_only names the adapter the safeguard judges against: leave safeguard on, or "
                             "remove source_only")
        if self.select == "auto" and not self.safeguard:
            raise ValueError("select: auto chooses by the safeguard's criteria: leave safeguard on")
        if chosen.phased and self.self_training is not None:
            raise ValueError(f"{self.method} trains a target adapter in a phase of its own; self_training joins the "
                             f"steps of one adapter: use one or the other")
        for name, method in TABLE.items():
            if method.settings is not None and name != self.method and getattr(self, name) is not None:
                raise ValueError(f"{name}: is for method {name}, not {self.method}")
        return self


def _settings_example(settings: type[BaseModel]) -> str:
    shown = [f"{k}: {'null' if f.default is None else f.default}" for k, f in list(settings.model_fields.items())[:3]]
    return "{" + ", ".join(shown) + (", ..." if len(settings.model_fields) > 3 else "") + "}"


DomainAdaptationSpec = create_model(
    "DomainAdaptationSpec", __base__=_Common, __doc__="The recipe's `domain_adaptation:` section.",
    **{name: (Optional[m.settings], Field(None, description=f"{name}'s settings, e.g. {_settings_example(m.settings)}"))
       for name, m in TABLE.items() if m.settings is not None},
)
