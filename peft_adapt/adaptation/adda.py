"""ADDA, adversarial discriminative domain adaptation (Tzeng et al. 2017), for LoRA classifiers.

Two phases, one adapter per domain. The source phase is ordinary training on the source's labels (the source
adapter and head, saved and registered as usual). The target phase starts a target adapter from the source
adapter and trains it as the generator of target features against a domain discriminator, GAN-style: the
discriminator learns to tell the fixed source encoder's features (label 1) from the target encoder's (label 0),
and the target adapter learns from the inverted label, until its features of the target text look like source
features. The head stays the source's, frozen, so the target adapter is served with it: it is saved as its own
classifier, `<domain>-adda`, beside the source's.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..data import pad_batch
from .base import AdaptationMethod, PhaseContext, PhaseOutcome
from .features import feature_kwargs, pooled_features
from .losses import DomainClassifier

SOURCE, TARGET = 1.0, 0.0  # the discriminator's labels; the generator learns from SOURCE on target features


@dataclass
class AddaLosses:
    discriminator: float
    generator: float


class AddaPhase:
    """The target phase's alternating steps: the discriminator on detached features, then the target adapter on
    the inverted label through the discriminator (whose gradients from it are dropped)."""

    def __init__(self, model: nn.Module, task: str, hidden_size: int, discriminator_hidden: int, learning_rate: float,
                 seed: int, source_weight: float = 0.0):
        self.model, self.task, self.source_weight = model, task, source_weight
        for name, param in model.named_parameters():
            if "classifier" in name:  # the source head, kept as it is: the target adapter is served with it
                param.requires_grad_(False)
        self.adapter = [p for p in model.parameters() if p.requires_grad]
        device = self.adapter[0].device
        torch.manual_seed(seed)
        self.discriminator = DomainClassifier(hidden_size, discriminator_hidden).to(device)
        # Adam with beta1 0.5, as in the paper: plain Adam oscillates in this min-max game
        self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=learning_rate, betas=(0.5, 0.999))
        self.g_optimizer = torch.optim.Adam(self.adapter, lr=learning_rate, betas=(0.5, 0.999))

    def target_features(self, batch: dict) -> torch.Tensor:
        outputs = self.model(**batch, **feature_kwargs(self.task))
        return pooled_features(outputs, batch["attention_mask"], self.task)

    def losses(self, source: torch.Tensor, target: torch.Tensor) -> AddaLosses:
        """Both losses on given features, without stepping anything."""
        with torch.no_grad():
            return AddaLosses(self._discriminator_loss(source, target).item(),
                              self._generator_loss(target).item())

    def _discriminator_loss(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = self.discriminator(torch.cat([source, target]))
        labels = torch.cat([torch.full((source.shape[0],), SOURCE), torch.full((target.shape[0],), TARGET)])
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.device))

    def _generator_loss(self, target: torch.Tensor) -> torch.Tensor:
        logits = self.discriminator(target)
        return nn.functional.binary_cross_entropy_with_logits(logits, torch.full_like(logits, SOURCE))

    def discriminator_step(self, source: torch.Tensor, target: torch.Tensor) -> float:
        self.d_optimizer.zero_grad()
        loss = self._discriminator_loss(source, target.detach())
        loss.backward()
        self.d_optimizer.step()
        return loss.item()

    def generator_step(self, batch: dict, source_batch: dict | None = None) -> float:
        """One step of the target adapter; returns the GAN loss. With a source weight, the source rows' classification
        loss through the target adapter (and the frozen head) joins it: the anchor that keeps the features the head
        reads from drifting while they move toward the source's (Tzeng's ADDA has none)."""
        self.g_optimizer.zero_grad()
        loss = self._generator_loss(self.target_features(batch))
        total = loss
        if self.source_weight and source_batch is not None:
            outputs = self.model(**source_batch)
            total = loss + self.source_weight * outputs.loss  # a mean over the rows
        total.backward()
        self.discriminator.zero_grad()  # the discriminator learns from its own loss only
        self.g_optimizer.step()
        return loss.item()


@torch.no_grad()
def source_features(model: nn.Module, features: list[dict], task: str, pad_token_id: int, device,
                    batch_size: int = 32) -> torch.Tensor:
    """The fixed source encoder's pooled features of the source rows, once (it does not change in this phase)."""
    model.eval()
    parts = []
    for start in range(0, len(features), batch_size):
        batch = pad_batch([{k: f[k] for k in ("input_ids", "attention_mask")} for f in features[start:start + batch_size]],
                          pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        parts.append(pooled_features(model(**batch, **feature_kwargs(task)), batch["attention_mask"], task))
    model.train()
    return torch.cat(parts)


class AddaSettings(BaseModel):
    """`domain_adaptation.adda:` the target phase."""

    model_config = ConfigDict(extra="forbid")
    steps: int | None = Field(None, ge=1, description="target-phase steps (default: the source phase's)")
    learning_rate: float = Field(1e-4, gt=0, description="Adam's rate for both players (beta1 0.5)")
    source_weight: float = Field(
        1.0, ge=0, description="x the source rows' classification loss beside the GAN loss, which anchors the "
                               "target adapter; 0: Tzeng's ADDA (collapsed to chance on LoRA)")
    hidden: int = Field(256, ge=1, description="the discriminator's hidden width")


class Adda(AdaptationMethod):
    name = "adda"
    settings = AddaSettings
    tasks = ("classification",)
    purpose = "adapts the source's classifier to the target"
    phased = True

    def run_phase(self, context: PhaseContext) -> PhaseOutcome:
        """The target phase: trains the target adapter in place of the source's, GAN-style, with the losses of both
        players in its history."""
        recipe, source = context.recipe, context.source
        settings, t = self.settings_of(recipe.domain_adaptation), recipe.training
        model, backbone, data = source.model, source.backbone, source.data
        target_rows = context.target_features()
        pad = backbone.tokenizer.pad_token_id
        device = next(p for p in model.parameters() if p.requires_grad).device
        fixed_source = source_features(model, data.train, recipe.task.type, pad, device)
        phase = AddaPhase(model, recipe.task.type, backbone.model.config.hidden_size, settings.hidden,
                          settings.learning_rate, t.seed, settings.source_weight)
        steps = settings.steps or source.metrics["steps"]
        rng = random.Random(t.seed)
        history, started = [], time.perf_counter()
        model.train()
        for step in range(1, steps + 1):
            rows = rng.sample(range(len(target_rows)), min(t.batch_size, len(target_rows)))
            batch = {k: v.to(device) for k, v in pad_batch([target_rows[i] for i in rows], pad).items()}
            chosen = torch.tensor(rng.sample(range(fixed_source.shape[0]), min(t.batch_size, fixed_source.shape[0])))
            d_loss = phase.discriminator_step(fixed_source[chosen.to(device)], phase.target_features(batch))
            source_batch = None
            if phase.source_weight:
                source_batch = pad_batch([data.train[i] for i in chosen.tolist()], pad)
                source_batch = {k: v.to(device) for k, v in source_batch.items()}
            g_loss = phase.generator_step(batch, source_batch)
            history.append({"step": step, "discriminator_loss": d_loss, "loss": g_loss})
        metrics = {"steps": steps, "train_seconds": time.perf_counter() - started, "threads": torch.get_num_threads(),
                   "source_adapter": str(source.out_dir), "rows": data.examples.n_rows,
                   "final_discriminator_loss": history[-1]["discriminator_loss"],
                   "final_generator_loss": history[-1]["loss"],
                   "trainable_parameters": sum(p.numel() for p in phase.adapter),
                   "total_parameters": source.metrics["total_parameters"]}
        return PhaseOutcome(metrics, history)
