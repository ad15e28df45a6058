"""What a domain-adaptation method provides. Every member another layer calls is declared here; training asks the
table (`adaptation/__init__.py`) and never branches on a method's name.

Two kinds of method:
- a *term* (dann, coral, mmd, entropy): every training step also runs a batch of the target's unlabeled text and
  adds `weight * term(source features, target features)` to the task loss;
- a *phase* (adda, generate): after the source adapter is trained and saved, a target adapter of its own is trained
  on the same model and saved as `<domain>-<method>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
from pydantic import BaseModel

ALL_TASKS = ("causal_lm", "classification", "token_classification")


@dataclass
class TermInputs:
    """What a term sees of one training step."""

    source: torch.Tensor  # [rows, hidden]: the source batch's pooled features, L2-normalised
    target: torch.Tensor  # [rows, hidden]: the same of a batch of the target's unlabeled text
    target_logits: torch.Tensor | None  # [rows, labels]: the classifier's logits of the target batch (classification)
    progress: float  # from 0 to 1 over training


class AlignmentTerm:
    """One method's loss term for one training run; it may own modules trained beside the adapter."""

    def modules(self) -> dict[str, torch.nn.Module]:
        """Modules trained beside the adapter (added to the optimizer, kept in checkpoints, saved nowhere else)."""
        return {}

    def __call__(self, step: TermInputs) -> tuple[torch.Tensor, float]:
        """(term, its weight) for one step."""
        raise NotImplementedError


class WeightedLoss(AlignmentTerm):
    """A term that is a plain function of the step, times a fixed weight (no modules of its own)."""

    def __init__(self, loss: Callable[[TermInputs], torch.Tensor], weight: float):
        self.loss, self.weight = loss, weight

    def __call__(self, step: TermInputs) -> tuple[torch.Tensor, float]:
        return self.loss(step), self.weight


@dataclass
class PhaseContext:
    """What a phase gets from training: the source run and the services it may call (training lies above this layer,
    so it hands them down rather than being imported)."""

    recipe: object  # the Recipe
    domain: str
    out_root: Path
    source: object  # the source phase's TrainResult: model, backbone, data, metrics, out_dir
    target_texts: Callable[[], list[str]]  # the target's text, labels never read
    target_features: Callable[[], list[dict]]  # the same, tokenized like the source
    train_recipe: Callable[[dict, str, Path], object]  # a recipe (as data) trained for one domain -> TrainResult
    predict_probabilities: Callable[[torch.nn.Module, list[dict]], torch.Tensor]  # [rows, labels] of a classifier
    train_epoch: Callable[[list[dict], str], dict]  # one epoch of the source model on rows -> {steps, seconds, history}


@dataclass
class PhaseOutcome:
    """What a phase trained into the source model (in place): its metrics and history; training evaluates and saves."""

    metrics: dict
    history: list[dict]
    generated: list = field(default_factory=list)  # generate: the kept samples


class AdaptationMethod:
    name: ClassVar[str]
    settings: ClassVar[type[BaseModel] | None] = None  # the recipe's nested `<name>: {...}` section, if any
    tasks: ClassVar[tuple[str, ...]] = ALL_TASKS  # the recipe tasks it adapts
    purpose: ClassVar[str] = ""  # what it adapts, for the error a recipe of another task gets
    phased: ClassVar[bool] = False  # trains a target adapter of its own after the source phase
    aligns: ClassVar[bool] = True  # False for `none`: self-training alone

    def term(self, spec, hidden_size: int, device: torch.device) -> AlignmentTerm:
        """The loss term of a term method, for one run (`spec`: the recipe's domain_adaptation section)."""
        raise NotImplementedError(f"{self.name} trains in a phase of its own, not as a term")

    def run_phase(self, context: PhaseContext) -> PhaseOutcome:
        """Train the target adapter in place of the source's, on the same model (the source adapter is saved)."""
        raise NotImplementedError(f"{self.name} is a term of every step, not a phase")

    def settings_of(self, spec) -> BaseModel | None:
        """This method's nested settings from the recipe section, defaults filled in."""
        if self.settings is None:
            return None
        return getattr(spec, self.name, None) or self.settings()
