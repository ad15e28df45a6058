"""Deep CORAL (Sun & Saenko 2016): the distance between the source and target batches' feature covariances."""

from __future__ import annotations

from .base import AdaptationMethod, AlignmentTerm
from .losses import coral_loss


class CoralTerm(AlignmentTerm):
    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, step):
        return coral_loss(step.source, step.target), self.weight


class Coral(AdaptationMethod):
    name = "coral"

    def term(self, spec, hidden_size, device):
        return CoralTerm(spec.weight)
