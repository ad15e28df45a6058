"""A meta-learned adapter initialisation (Reptile; Nichol, Achiam & Schulman 2018) across a recipe's domains.

Each domain is a task. An outer step copies the initialisation into the adapter (and head), trains it a few inner
steps on one domain's rows (a fresh Adam each time), and moves the initialisation part of the way toward where
training went: `init += meta_lr * (adapted - init)`, `meta_lr` falling linearly to 0. What it learns is where a
domain's adapter should start so that a few steps on a few rows of a new domain go far. It is saved like any adapter
(domain `meta`) and registered; a recipe's `init_from:` starts from it (initialisation.py), with `training.shots`.
First-order, no second derivatives: on a quantized base it costs what plain training costs.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import pad_batch, read_domain, tokenize_domain
from ..errors import UserInputError
from ..formats import check_output_folder
from ..models.backbone import load_backbone
from ..registry.refs import check_name
from .domain import TrainResult, count_parameters, prepare_model, save_trained
from .evaluation import evaluate_task


@dataclass
class MetaSettings:
    meta_steps: int = 100  # outer steps (each one domain's inner loop)
    inner_steps: int = 8
    meta_lr: float = 1.0  # the first outer step's share of the way; falls linearly to 0
    inner_lr: float | None = None  # default: the recipe's learning_rate

    def __post_init__(self):
        for flag, value in (("--meta-steps", self.meta_steps), ("--inner-steps", self.inner_steps)):
            if not isinstance(value, int) or value < 1:
                raise UserInputError(f"meta-train {flag} {value!r}: give a whole number of steps, at least 1")
        if not math.isfinite(self.meta_lr) or not 0 < self.meta_lr <= 1:
            raise UserInputError(f"meta-train --meta-lr {self.meta_lr!r}: give the first step's share of the way, "
                                 f"a number in (0, 1]")
        if self.inner_lr is not None and (not math.isfinite(self.inner_lr) or self.inner_lr <= 0):
            raise UserInputError(f"meta-train --inner-lr {self.inner_lr!r}: give a positive finite learning rate")


def reptile_step(init: list[torch.Tensor], adapted: list[torch.Tensor], share: float) -> None:
    """Move the initialisation `share` of the way toward the adapted weights, in place."""
    for start, end in zip(init, adapted):
        start.add_(end.detach().to(start.dtype) - start, alpha=share)


def meta_train(recipe, out_root, settings: MetaSettings = MetaSettings(), registry=None, overwrite: bool = False):
    """Learn an initialisation over the recipe's domains; save it as `<name>-meta` in `out_root/meta` (returns its
    TrainResult). Every domain must share one label map (the head is part of what is learned)."""

    if recipe.adapter is None:
        raise UserInputError(f"{recipe.source}: meta-train learns an adapter's initialisation; the recipe trains none")
    if len(recipe.domains) < 2:
        raise UserInputError(f"{recipe.source}: meta-train learns across domains; the recipe names one")
    if recipe.task.type not in ("classification", "causal_lm"):
        raise UserInputError(f"meta-train: task {recipe.task.type} is not supported (classification, causal_lm)")
    out_dir = Path(out_root) / "meta"
    check_name(f"{recipe.name}-meta" if recipe.name else "meta")
    check_output_folder(out_dir, overwrite)  # before anything is read or written
    t = recipe.training
    torch.manual_seed(t.seed)
    examples = {}
    for domain, spec in recipe.domains.items():
        examples[domain] = read_domain(recipe.task, recipe.data_path(spec.train),
                                       recipe.data_path(spec.eval) if spec.eval else None, None, t.seed,
                                       t.max_train_rows, t.max_eval_rows, t.shots)
    label_maps = {d: e.labels.names if e.labels else None for d, e in examples.items()}
    if len({tuple(v or ()) for v in label_maps.values()}) != 1:
        raise UserInputError(f"meta-train: the domains' label maps differ ({label_maps}); one head is learned for all")
    first = next(iter(examples.values()))
    num_labels = len(first.labels.names) if first.labels else None
    backbone = load_backbone(recipe.base, recipe.task.type, num_labels, recipe.task.pooling)
    data = {d: tokenize_domain(e, backbone.tokenizer, recipe.task) for d, e in examples.items()}
    model = prepare_model(recipe, backbone)
    params = [p for p in model.parameters() if p.requires_grad]
    init = [p.detach().clone() for p in params]
    pad = backbone.tokenizer.pad_token_id
    rng = random.Random(t.seed)
    order: list[str] = []
    history, started = [], time.perf_counter()
    model.train()
    for step in range(settings.meta_steps):
        if not order:  # every domain once per round, in a seeded order
            order = list(data)
            rng.shuffle(order)
        domain = order.pop()
        with torch.no_grad():
            for p, start in zip(params, init):
                p.copy_(start)
        optimizer = torch.optim.AdamW(params, lr=settings.inner_lr or t.learning_rate, weight_decay=t.weight_decay)
        rows = data[domain].train
        losses = []
        for _ in range(settings.inner_steps):
            chosen = [rows[i] for i in rng.sample(range(len(rows)), min(t.batch_size, len(rows)))]
            batch = {k: v.to(backbone.device) for k, v in pad_batch(chosen, pad).items()}
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        share = settings.meta_lr * (1 - step / settings.meta_steps)
        with torch.no_grad():
            reptile_step(init, params, share)
        history.append({"step": step + 1, "domain": domain, "loss": sum(losses) / len(losses),
                        "last_inner_loss": losses[-1], "meta_lr": share})
    with torch.no_grad():
        for p, start in zip(params, init):
            p.copy_(start)
    wall = time.perf_counter() - started
    trainable, total = count_parameters(model)
    metrics = {"meta_steps": settings.meta_steps, "inner_steps": settings.inner_steps, "meta_lr": settings.meta_lr,
               "inner_lr": settings.inner_lr or t.learning_rate, "domains": list(data), "train_seconds": wall,
               "threads": torch.get_num_threads(), "trainable_parameters": trainable, "total_parameters": total,
               "steps": settings.meta_steps * settings.inner_steps}
    eval_batch = t.eval_batch_size or t.batch_size
    metrics["eval"] = {d: evaluate_task(model, v.eval, recipe.task.type, pad, num_labels, eval_batch,
                                        first.labels.names if first.labels else None)
                       for d, v in data.items() if v.eval}
    manifest = save_trained(recipe, "meta", out_dir, model, backbone, next(iter(data.values())), metrics, history)
    result = TrainResult("meta", out_dir, metrics, manifest, model, backbone, next(iter(data.values())))
    if registry is not None:
        result.registered = registry.add(out_dir)
    return result
