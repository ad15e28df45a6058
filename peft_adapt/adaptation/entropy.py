"""Entropy minimisation on the target (Grandvalet & Bengio 2005): the classifier's mean prediction entropy on the
target's unlabeled rows, so its decision boundaries move into the target's low-density regions. Classification only.
"""

from __future__ import annotations

import torch

from .base import AdaptationMethod, AlignmentTerm


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The mean entropy (nats) of the softmax of [rows, labels] logits."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


class EntropyTerm(AlignmentTerm):
    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, step):
        return prediction_entropy(step.target_logits), self.weight


class Entropy(AdaptationMethod):
    name = "entropy"
    tasks = ("classification",)
    purpose = "sharpens the classifier's predictions on the target"

    def term(self, spec, hidden_size, device):
        return EntropyTerm(spec.weight)
