"""DANN (Ganin et al., JMLR 2016): a small domain classifier learns to tell source from target features, the adapter
learns features it cannot, with a strength rising as 2 / (1 + exp(-gamma p)) - 1 over training progress p."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .base import AdaptationMethod, AlignmentTerm
from .losses import DomainClassifier, dann_confusion_loss, dann_lambda, dann_loss


class DannSettings(BaseModel):
    """`domain_adaptation.dann:` the adversary."""

    model_config = ConfigDict(extra="forbid")
    gamma: float = Field(10.0, gt=0, description="how fast the adversary's strength rises")
    adversary: Literal["confusion", "reversal"] = Field(
        "confusion", description="confusion: toward features the domain classifier cannot tell apart; reversal: "
                                 "Ganin's reversed gradient")
    hidden: int = Field(256, ge=1, description="the domain classifier's hidden width")


class DannTerm(AlignmentTerm):
    def __init__(self, settings: DannSettings, weight: float, hidden_size: int, device: torch.device):
        self.settings, self.weight = settings, weight
        self.classifier = DomainClassifier(hidden_size, settings.hidden).to(device)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"_domain_classifier": self.classifier}

    def __call__(self, step):
        # as in Ganin et al. the weight scales only the reversed gradient reaching the adapter and the domain
        # classifier's loss is not scaled (under AdamW that scale would cancel anyway)
        lam = self.weight * dann_lambda(step.progress, self.settings.gamma)
        adversarial = dann_confusion_loss if self.settings.adversary == "confusion" else dann_loss
        return adversarial(step.source, step.target, self.classifier, lam), 1.0


class Dann(AdaptationMethod):
    name = "dann"
    settings = DannSettings

    def term(self, spec, hidden_size, device):
        return DannTerm(self.settings_of(spec), spec.weight, hidden_size, device)
