"""Training with a domain-adaptation term: every step also runs a batch of unlabeled target-domain text
through the same model, and adds `weight * objective(source features, target features)` to the task loss.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .checkpoints import AdapterTrainer
from .heads import pool_hidden
from .objectives import DomainAdaptationSpec, DomainClassifier, coral_loss, dann_lambda, dann_loss, mmd_loss


def feature_kwargs(task: str) -> dict:
    return {"output_hidden_states": True} if task == "causal_lm" else {"return_pooled": True}


def pooled_features(outputs, attention_mask: torch.Tensor, task: str) -> torch.Tensor:
    """[batch, hidden]: the head's pooled features (or for causal LM the mean of the last hidden states),
    L2-normalised as sentence embeddings are, so no objective can be met by growing or shrinking them: with
    raw features the DANN domain loss grew without bound (17-25) and took the task with it."""
    if task == "causal_lm":
        hidden = outputs.hidden_states[-1]
        features = pool_hidden(hidden.float(), attention_mask[:, -hidden.shape[1]:], "mean")
    else:
        features = outputs.hidden_states[0]
    return torch.nn.functional.normalize(features.float(), dim=-1)


class DomainAdaptationTrainer(AdapterTrainer):
    def __init__(self, *args, adaptation: DomainAdaptationSpec, target_features: list[dict], task: str,
                 hidden_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.adaptation = adaptation
        self.task = task
        generator = torch.Generator().manual_seed(self.args.seed)
        self.target_loader = DataLoader(target_features, batch_size=self.args.per_device_train_batch_size,
                                        shuffle=True, collate_fn=self.data_collator, generator=generator)
        self._target_batches = iter(())
        self.domain_classifier = None
        if adaptation.method == "dann":
            device = next(p for p in self.model.parameters() if p.requires_grad).device
            self.domain_classifier = DomainClassifier(hidden_size, adaptation.dann_hidden).to(device)
        self.model_accepts_loss_kwargs = False  # our loss is a mean already: let Trainer scale for accumulation
        self._da_losses: list[float] = []

    def extra_state(self) -> dict[str, torch.nn.Module]:
        return {"_domain_classifier": self.domain_classifier} if self.domain_classifier is not None else {}

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.domain_classifier is not None:  # trained alongside the adapter, saved nowhere
            optimizer.add_param_group({"params": list(self.domain_classifier.parameters()), "weight_decay": 0.0})
        return optimizer

    def _next_target(self) -> dict:
        try:
            batch = next(self._target_batches)
        except StopIteration:  # the target text cycles for as long as the source trains
            self._target_batches = iter(self.target_loader)
            batch = next(self._target_batches)
        device = next(p for p in self.model.parameters() if p.requires_grad).device
        return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        extra = feature_kwargs(self.task)
        outputs = model(**inputs, **extra)
        target = self._next_target()
        target_outputs = model(**target, **extra)
        source = pooled_features(outputs, inputs["attention_mask"], self.task)
        target_features = pooled_features(target_outputs, target["attention_mask"], self.task)
        weight = self.adaptation.weight
        if self.adaptation.method == "dann":
            # as in Ganin et al. the weight scales only the reversed gradient reaching the adapter and the domain
            # classifier's loss is not scaled (under AdamW that scale would cancel anyway)
            progress = self.state.global_step / max(1, self.state.max_steps)
            term = dann_loss(source, target_features, self.domain_classifier,
                             weight * dann_lambda(progress, self.adaptation.dann_gamma))
            weight = 1.0
        elif self.adaptation.method == "coral":
            term = coral_loss(source, target_features)
        else:
            term = mmd_loss(source, target_features)
        self._da_losses.append(float(term.detach()))
        loss = outputs.loss + weight * term
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._da_losses:
            logs[f"{self.adaptation.method}_loss"] = sum(self._da_losses) / len(self._da_losses)
            self._da_losses.clear()
        super().log(logs, *args, **kwargs)
