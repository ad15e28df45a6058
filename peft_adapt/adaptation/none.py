"""`method: none`: no alignment term; the target is used by self-training alone (self_training.py)."""

from __future__ import annotations

from .base import AdaptationMethod


class NoAlignment(AdaptationMethod):
    name = "none"
    aligns = False
