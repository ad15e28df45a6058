"""Self-training on the target domain's unlabeled text: the adapter being trained labels the target rows it is
confident about, and those pseudo-labelled rows join training as a second classification loss.

Rounds are spread over training: after a source-only warm-up of 1 / (rounds + 1) of the steps, the target is
relabelled at the start of each round with the model as it is then, so later rounds see a better labeller.
Rows below `threshold` are left out; with `balance` every class keeps as many rows as the rarest confident
class has (its most confident ones), so a labeller leaning to one class cannot teach the adapter only that class.
With `agree`, a row is kept only where the current model and the first round's labeller (the model after its
source-only warm-up) give it the same label: two models must be confident together. Self-training stops (teaches
nothing more) when the two agree on less than `min_agreement` of the target, or when the current model gives one
class more than `max_class_share` of the target: its labels are drifting or collapsing, and more rounds would
teach the drift. `thresholds: flexmatch` lowers the threshold of the classes the model is still unsure about
(FlexMatch, Zhang et al. 2021: class c's threshold is threshold * b / (2 - b), b the share of its confident rows
against the most confident class's, or against the rows no class is confident on yet, whichever is larger), so a
class the source taught less well is not starved of target rows. The target file's own labels are never read (see objectives.read_target_texts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class SelfTrainingSpec(BaseModel):
    """`domain_adaptation.self_training:` pseudo-labels from the adapter being trained (classification)."""

    model_config = ConfigDict(extra="forbid")
    rounds: int = Field(2, ge=1, description="relabelling passes, spread evenly after a source-only warm-up")
    threshold: float = Field(0.9, gt=0, lt=1, description="least predicted probability a pseudo-label needs")
    balance: bool = Field(True, description="as many rows per class as the rarest confident class has")
    weight: float = Field(1.0, gt=0, description="x the pseudo-labelled rows' loss")
    agree: bool = Field(True, description="keep only rows the warm-up (source-only) labeller labels the same way")
    min_agreement: float = Field(0.6, ge=0, le=1, description="stop when the current model and the warm-up labeller "
                                                              "agree on less of the target than this")
    max_class_share: float = Field(0.95, gt=0, le=1, description="stop when one class takes more of the target")
    thresholds: Literal["fixed", "flexmatch"] = Field(
        "fixed", description="fixed: `threshold` for every class; flexmatch: lower for classes with fewer confident "
                             "rows (FlexMatch's curriculum)")


@dataclass
class PseudoLabels:
    """One round's choice: target row positions, their labels and the labeller's confidence in each."""

    step: int
    rows: list[int]
    labels: list[int]
    confidences: list[float]
    candidates: int  # target rows labelled
    agreement: float = 1.0  # share of the target the current model labels as the warm-up labeller did
    stopped: str | None = None  # why self-training stopped at this round, if it did
    thresholds: list[float] | None = None  # each class's threshold this round

    def summary(self, num_labels: int) -> dict:
        per_class = [self.labels.count(c) for c in range(num_labels)]
        mean = sum(self.confidences) / len(self.confidences) if self.confidences else None
        return {"step": self.step, "selected": len(self.rows), "of": self.candidates, "per_class": per_class,
                "mean_confidence": mean, "agreement": self.agreement, "stopped": self.stopped,
                "thresholds": self.thresholds}


def class_thresholds(probabilities: torch.Tensor, threshold: float, kind: str = "fixed") -> torch.Tensor:
    """Each class's threshold: `threshold` (fixed), or FlexMatch's, lower for classes with fewer confident rows."""
    classes = probabilities.shape[-1]
    if kind == "fixed":
        return torch.full((classes,), threshold)
    confidence, labels = probabilities.max(dim=-1)
    learned = torch.bincount(labels[confidence >= threshold], minlength=classes).float()
    unsure = len(labels) - float(learned.sum())
    beta = learned / max(float(learned.max()), unsure, 1.0)
    return threshold * beta / (2 - beta)


def select_pseudo_labels(probabilities: torch.Tensor, threshold: float | torch.Tensor, balance: bool,
                         allowed: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
    """Rows (and their argmax labels) whose top probability reaches `threshold` (one for all, or one per class)
    among the `allowed` rows, if given; with `balance`, the most confident n of each class, n the count of the rarest
    class (0 when a class has no confident row: nothing is taught)."""
    confidence, labels = probabilities.max(dim=-1)
    confident = confidence >= (threshold[labels] if isinstance(threshold, torch.Tensor) else threshold)
    chosen = (confident & allowed if allowed is not None else confident).nonzero().flatten()
    by_class = [chosen[labels[chosen] == c] for c in range(probabilities.shape[-1])]
    if balance:
        keep = min(len(rows) for rows in by_class)
        by_class = [rows[confidence[rows].argsort(descending=True)[:keep]] for rows in by_class]
    rows = sorted(int(r) for rows in by_class for r in rows)
    return rows, [int(labels[r]) for r in rows]


def drift(labels: torch.Tensor, reference: torch.Tensor, num_labels: int, spec: SelfTrainingSpec) -> tuple[float, str | None]:
    """(agreement with the warm-up labeller, why self-training should stop or None) for the current labels."""
    agreement = float((labels == reference).float().mean())
    share = float(torch.bincount(labels, minlength=num_labels).max()) / len(labels)
    if agreement < spec.min_agreement:
        return agreement, (f"the model now labels only {agreement:.0%} of the target as its warm-up labeller did "
                           f"(min_agreement {spec.min_agreement})")
    if num_labels > 1 and share > spec.max_class_share:
        return agreement, f"one class takes {share:.0%} of the target (max_class_share {spec.max_class_share})"
    return agreement, None


def round_starts(total_steps: int, rounds: int) -> list[int]:
    """The steps at which the target is relabelled: after a warm-up, evenly spaced."""
    return [max(1, round(r * total_steps / (rounds + 1))) for r in range(1, rounds + 1)]
