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

import torch
from torch import nn


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
