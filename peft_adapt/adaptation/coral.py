"""Deep CORAL (Sun & Saenko 2016): the distance between the source and target batches' feature covariances."""

from __future__ import annotations

from .base import AdaptationMethod, WeightedLoss
from .losses import coral_loss


class Coral(AdaptationMethod):
    name = "coral"

    def term(self, spec, hidden_size, device):
        return WeightedLoss(lambda step: coral_loss(step.source, step.target), spec.weight)
