"""Self-training on the target domain's unlabeled text: the adapter being trained labels the target rows it is
confident about, and those pseudo-labelled rows join training as a second classification loss.

Rounds are spread over training: after a source-only warm-up of 1 / (rounds + 1) of the steps, the target is
relabelled at the start of each round with the model as it is then, so later rounds see a better labeller.
Rows below `threshold` are left out; with `balance` every class keeps as many rows as the rarest confident
class has (its most confident ones), so a labeller leaning to one class cannot teach the adapter only that class.
The target file's own labels are never read (see objectives.read_target_texts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field


class SelfTrainingSpec(BaseModel):
    """`domain_adaptation.self_training:` pseudo-labels from the adapter being trained (classification)."""

    model_config = ConfigDict(extra="forbid")
    rounds: int = Field(2, ge=1, description="relabelling passes, spread evenly after a source-only warm-up")
    threshold: float = Field(0.9, gt=0, lt=1, description="least predicted probability a pseudo-label needs")
    balance: bool = Field(True, description="as many rows per class as the rarest confident class has")
    weight: float = Field(1.0, gt=0, description="x the pseudo-labelled rows' loss")


@dataclass
class PseudoLabels:
    """One round's choice: target row positions, their labels and the labeller's confidence in each."""

    step: int
    rows: list[int]
    labels: list[int]
    confidences: list[float]
    candidates: int  # target rows labelled

    def summary(self, num_labels: int) -> dict:
        per_class = [self.labels.count(c) for c in range(num_labels)]
        mean = sum(self.confidences) / len(self.confidences) if self.confidences else None
        return {"step": self.step, "selected": len(self.rows), "of": self.candidates, "per_class": per_class,
                "mean_confidence": mean}


def select_pseudo_labels(probabilities: torch.Tensor, threshold: float, balance: bool) -> tuple[list[int], list[int]]:
    """Rows (and their argmax labels) whose top probability reaches `threshold`; with `balance`, the most confident
    n of each class, n the count of the rarest class (0 when a class has no confident row: nothing is taught)."""
    confidence, labels = probabilities.max(dim=-1)
    chosen = (confidence >= threshold).nonzero().flatten()
    by_class = [chosen[labels[chosen] == c] for c in range(probabilities.shape[-1])]
    if balance:
        keep = min(len(rows) for rows in by_class)
        by_class = [rows[confidence[rows].argsort(descending=True)[:keep]] for rows in by_class]
    rows = sorted(int(r) for rows in by_class for r in rows)
    return rows, [int(labels[r]) for r in rows]


def round_starts(total_steps: int, rounds: int) -> list[int]:
    """The steps at which the target is relabelled: after a warm-up, evenly spaced."""
    return [max(1, round(r * total_steps / (rounds + 1))) for r in range(1, rounds + 1)]
