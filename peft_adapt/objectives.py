"""Domain-adaptation objectives: loss terms on pooled features of a labeled source batch and an
unlabeled target batch, added to the task loss with a weight.

- `dann` (Ganin et al., JMLR 2016): a small domain classifier learns to tell source from target features, the
  adapter learns features it cannot, with a strength lambda_p = 2 / (1 + exp(-gamma p)) - 1 over training progress
  p in [0, 1]. Two adversaries: `reversal`, Ganin's gradient-reversal layer (the adapter maximises the classifier's
  loss: on these pairs it pushed features to where the classifier is confidently *wrong*, the domain loss climbed
  to 3 and target accuracy fell below source-only), and `confusion` (the default), the domain-confusion loss of
  Tzeng et al. 2015 as ADDA uses it: the adapter is trained toward features the classifier scores 1/2 for both
  domains, a loss bounded below at confusion, so no feature is pushed past it.
- `coral` (Sun & Saenko 2016, Deep CORAL): ||C_s - C_t||_F^2 / (4 d^2), the distance between the two
  batches' feature covariances.
- `mmd` (Long et al. 2015): multi-kernel maximum mean discrepancy, the biased estimate of MMD^2 with a sum
  of Gaussian kernels whose bandwidths are multiples of the pooled batches' mean squared distance.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .generative import GeneratorSpec
from .self_training import SelfTrainingSpec

PHASED = ("adda", "generate")  # methods that train a target adapter of their own after the source phase

class DomainAdaptationSpec(BaseModel):
    """The recipe's `domain_adaptation:` section."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["dann", "coral", "mmd", "adda", "generate", "none"] = Field(
        json_schema_extra={"example": "dann"},
        description="the alignment term; adda / generate: a target adapter of its own (adda.py, generative.py); "
                    "none: self-training alone")
    target: str = Field(description="unlabeled target-domain text (its labels are never read)",
                        json_schema_extra={"example": "${PEFT_ADAPT_DATA}/amazon_multidomain/kitchen.train.jsonl"})
    weight: float = Field(1.0, ge=0, description="coral / mmd: x the term; dann: x the adversary's strength")
    max_target_rows: int | None = Field(None, ge=1)
    dann_gamma: float = Field(10.0, gt=0, description="how fast the adversary's strength rises")
    dann_adversary: Literal["confusion", "reversal"] = Field(
        "confusion", description="confusion: toward features the domain classifier cannot tell apart; reversal: "
                                 "Ganin's reversed gradient")
    dann_hidden: int = Field(256, ge=1, description="the domain classifier's hidden width")
    adda_steps: int | None = Field(None, ge=1, description="adda: target-phase steps (default: the source phase's)")
    adda_learning_rate: float = Field(1e-4, gt=0, description="adda: Adam's rate for both players (beta1 0.5)")
    adda_source_weight: float = Field(
        1.0, ge=0, description="adda: x the source rows' classification loss beside the GAN loss, which anchors the "
                               "target adapter; 0: Tzeng's ADDA (collapsed to chance on LoRA)")
    generator: GeneratorSpec | None = Field(
        None, description="generate: the generator of target samples, e.g. {model: smollm2-135m, samples: 400}")
    self_training: SelfTrainingSpec | None = Field(
        None, description="classification: also learn the adapter's confident labels of the target, "
                          "e.g. {rounds: 2, threshold: 0.9, balance: true, weight: 1.0}")

    @model_validator(mode="after")
    def _does_something(self):
        if self.method == "none" and self.self_training is None:
            raise ValueError("method none aligns nothing: add self_training: {rounds: 2, threshold: 0.9} or name "
                             "dann, coral, mmd or adda")
        if self.method in PHASED and self.self_training is not None:
            raise ValueError(f"{self.method} trains a target adapter in a phase of its own; self_training joins the "
                             f"steps of one adapter: use one or the other")
        if self.generator is not None and self.method != "generate":
            raise ValueError(f"generator: is for method generate, not {self.method}")
        return self


class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient multiplied by -lambda backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def reverse_gradient(x: torch.Tensor, lam: float) -> torch.Tensor:
    return GradientReversal.apply(x, lam)


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """The schedule of Ganin et al.: 0 at the start, approaching 1 by the end of training."""
    return 2.0 / (1.0 + math.exp(-gamma * min(max(progress, 0.0), 1.0))) - 1.0


class DomainClassifier(nn.Module):
    def __init__(self, features: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def dann_loss(source: torch.Tensor, target: torch.Tensor, classifier: DomainClassifier, lam: float) -> torch.Tensor:
    """Binary cross-entropy of the domain classifier (source 0, target 1) on gradient-reversed features."""
    features = reverse_gradient(torch.cat([source, target]).float(), lam)
    labels = torch.cat([source.new_zeros(source.shape[0]), target.new_ones(target.shape[0])]).float()
    return nn.functional.binary_cross_entropy_with_logits(classifier(features), labels)


def dann_confusion_loss(source: torch.Tensor, target: torch.Tensor, classifier: DomainClassifier,
                        lam: float) -> torch.Tensor:
    """The domain classifier's cross-entropy on detached features (it alone learns from it), plus lam x the
    features' cross-entropy against 1/2 through the classifier's parameters held fixed (the adapter alone learns
    from it), less its floor log 2: 0 when the classifier cannot tell the domains apart."""
    features = torch.cat([source, target]).float()
    labels = torch.cat([source.new_zeros(source.shape[0]), target.new_ones(target.shape[0])]).float()
    classifier_loss = nn.functional.binary_cross_entropy_with_logits(classifier(features.detach()), labels)
    fixed = {name: p.detach() for name, p in classifier.named_parameters()}
    logits = torch.func.functional_call(classifier, fixed, (features,))
    confusion = nn.functional.binary_cross_entropy_with_logits(logits, torch.full_like(labels, 0.5)) - math.log(2)
    return classifier_loss + lam * confusion


def _covariance(x: torch.Tensor) -> torch.Tensor:
    centered = x - x.mean(0, keepdim=True)
    return centered.T @ centered / max(1, x.shape[0] - 1)


def coral_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    d = source.shape[1]
    diff = _covariance(source.float()) - _covariance(target.float())
    return (diff * diff).sum() / (4 * d * d)


def mmd_loss(source: torch.Tensor, target: torch.Tensor, multipliers=(0.25, 0.5, 1.0, 2.0, 4.0)) -> torch.Tensor:
    x = torch.cat([source, target]).float()
    distances = torch.cdist(x, x).square()
    n = x.shape[0]
    bandwidth = distances.sum().detach() / max(1, n * n - n)  # mean squared distance: the base bandwidth
    bandwidth = bandwidth.clamp(min=1e-6)
    kernel = sum(torch.exp(-distances / (bandwidth * m)) for m in multipliers)
    s = source.shape[0]
    return kernel[:s, :s].mean() + kernel[s:, s:].mean() - 2 * kernel[:s, s:].mean()


def read_target_texts(path: Path, text_field: str = "text", max_rows: int | None = None) -> list[str]:
    """The target domain's text only: every other field of the file (labels included) is never read."""
    from .data import read_rows, text_of

    rows = read_rows(path, "train")
    texts = [text_of(row, text_field, f"row {n}", path) for n, row in rows]
    return texts[:max_rows] if max_rows else texts
