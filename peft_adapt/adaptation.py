"""Training with a domain-adaptation term: every step also runs a batch of unlabeled target-domain text
through the same model, and adds `weight * objective(source features, target features)` to the task loss;
with self-training, also a batch of target rows the model itself labelled confidently (self_training.py).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .checkpoints import AdapterTrainer
from .evaluation import predict_probabilities
from .heads import pool_hidden
from .objectives import (DomainAdaptationSpec, DomainClassifier, coral_loss, dann_confusion_loss, dann_lambda, dann_loss,
                         mmd_loss)
from .self_training import PseudoLabels, round_starts, select_pseudo_labels


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
        self.target_features = target_features
        self.pseudo_label_rounds: list[PseudoLabels] = []
        self._rounds_started = 0
        self._pseudo_loader = None
        self._pseudo_batches = iter(())
        self._pseudo_losses: list[float] = []
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

    def _device(self) -> torch.device:
        return next(p for p in self.model.parameters() if p.requires_grad).device

    def _next_target(self) -> dict:
        try:
            batch = next(self._target_batches)
        except StopIteration:  # the target text cycles for as long as the source trains
            self._target_batches = iter(self.target_loader)
            batch = next(self._target_batches)
        return {k: v.to(self._device()) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        aligning = self.adaptation.method != "none"
        outputs = model(**inputs, **(feature_kwargs(self.task) if aligning else {}))
        loss = outputs.loss
        if aligning:
            term, weight = self._alignment_term(model, outputs, inputs["attention_mask"])
            self._da_losses.append(float(term.detach()))
            loss = loss + weight * term
        if self.adaptation.self_training is not None:
            pseudo = self._pseudo_labelled_loss(model)
            if pseudo is not None:
                self._pseudo_losses.append(float(pseudo.detach()))
                loss = loss + self.adaptation.self_training.weight * pseudo
        return (loss, outputs) if return_outputs else loss

    def _alignment_term(self, model, outputs, attention_mask) -> tuple[torch.Tensor, float]:
        """(term, its weight) from the source batch's outputs and a fresh target batch."""
        target = self._next_target()
        target_outputs = model(**target, **feature_kwargs(self.task))
        source = pooled_features(outputs, attention_mask, self.task)
        target_features = pooled_features(target_outputs, target["attention_mask"], self.task)
        if self.adaptation.method == "dann":
            # as in Ganin et al. the weight scales only the reversed gradient reaching the adapter and the domain
            # classifier's loss is not scaled (under AdamW that scale would cancel anyway)
            progress = self.state.global_step / max(1, self.state.max_steps)
            lam = self.adaptation.weight * dann_lambda(progress, self.adaptation.dann_gamma)
            adversarial = dann_confusion_loss if self.adaptation.dann_adversary == "confusion" else dann_loss
            return adversarial(source, target_features, self.domain_classifier, lam), 1.0
        if self.adaptation.method == "coral":
            return coral_loss(source, target_features), self.adaptation.weight
        return mmd_loss(source, target_features), self.adaptation.weight

    def _pseudo_labelled_loss(self, model) -> torch.Tensor | None:
        """The loss on a batch of confidently self-labelled target rows; relabels when a round starts.
        None before the first round, and in a round where no class had a confident row."""
        spec = self.adaptation.self_training
        due = sum(step <= self.state.global_step for step in round_starts(self.state.max_steps, spec.rounds))
        if due > self._rounds_started:  # a resumed run relabels once, with the model it resumed
            self._rounds_started = due
            self._relabel(model)
        if self._pseudo_loader is None:
            return None
        try:
            batch = next(self._pseudo_batches)
        except StopIteration:
            self._pseudo_batches = iter(self._pseudo_loader)
            batch = next(self._pseudo_batches)
        return model(**{k: v.to(self._device()) for k, v in batch.items()}).loss

    def _relabel(self, model) -> None:
        spec = self.adaptation.self_training
        try:  # in eval mode (no dropout), then back to training for the rest of this step
            probabilities = predict_probabilities(model, self.target_features, self.data_collator.pad_token_id,
                                                  self.args.per_device_eval_batch_size)
        finally:
            model.train()
        rows, labels = select_pseudo_labels(probabilities, spec.threshold, spec.balance)
        confidences = [float(probabilities[r].max()) for r in rows]
        self.pseudo_label_rounds.append(PseudoLabels(self.state.global_step, rows, labels, confidences,
                                                     len(self.target_features)))
        self._pseudo_loader = None
        self._pseudo_batches = iter(())
        if rows:
            chosen = [self.target_features[r] | {"labels": label} for r, label in zip(rows, labels)]
            generator = torch.Generator().manual_seed(self.args.seed + len(self.pseudo_label_rounds))
            self._pseudo_loader = DataLoader(chosen, batch_size=self.args.per_device_train_batch_size, shuffle=True,
                                             collate_fn=self.data_collator, generator=generator)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._da_losses:
            logs[f"{self.adaptation.method}_loss"] = sum(self._da_losses) / len(self._da_losses)
            self._da_losses.clear()
        if "loss" in logs and self._pseudo_losses:
            logs["pseudo_labelled_loss"] = sum(self._pseudo_losses) / len(self._pseudo_losses)
            self._pseudo_losses.clear()
        if "loss" in logs and self.pseudo_label_rounds:
            logs["pseudo_labels"] = len(self.pseudo_label_rounds[-1].rows)
        super().log(logs, *args, **kwargs)
