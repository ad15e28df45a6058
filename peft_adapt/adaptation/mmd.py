"""Multi-kernel MMD (Long et al. 2015): the maximum mean discrepancy between source and target features under a sum
of Gaussian kernels."""

from __future__ import annotations

from .base import AdaptationMethod, AlignmentTerm
from .losses import mmd_loss


class MmdTerm(AlignmentTerm):
    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, step):
        return mmd_loss(step.source, step.target), self.weight


class Mmd(AdaptationMethod):
    name = "mmd"

    def term(self, spec, hidden_size, device):
        return MmdTerm(spec.weight)
