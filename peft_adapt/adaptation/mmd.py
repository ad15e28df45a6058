"""Multi-kernel MMD (Long et al. 2015): the maximum mean discrepancy between source and target features under a sum
of Gaussian kernels."""

from __future__ import annotations

from .base import AdaptationMethod, WeightedLoss
from .losses import mmd_loss


class Mmd(AdaptationMethod):
    name = "mmd"

    def term(self, spec, hidden_size, device):
        return WeightedLoss(lambda step: mmd_loss(step.source, step.target), spec.weight)
