"""Training with a domain-adaptation term: every step also runs a batch of unlabeled target-domain text through the
same model and adds the method's `weight * term` to the task loss (the method asked through the adaptation table);
with self-training, also a batch of target rows the model itself labelled confidently (adaptation/self_training.py).
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader

from ..adaptation import adaptation_method
from ..adaptation.base import TermInputs
from ..adaptation.features import feature_kwargs, pooled_features
from ..adaptation.self_training import PseudoLabels, class_thresholds, drift, round_starts, select_pseudo_labels
from .checkpoints import AdapterTrainer
from .evaluation import predict_probabilities

log = logging.getLogger(__name__)


class DomainAdaptationTrainer(AdapterTrainer):
    def __init__(self, *args, adaptation, target_features: list[dict], task: str, hidden_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.adaptation = adaptation
        self.task = task
        self.target_features = target_features
        self.pseudo_label_rounds: list[PseudoLabels] = []
        self._reference_labels = None  # the first round's labels: the model after its source-only warm-up
        self._stopped = False
        self._rounds_started = 0
        self._pseudo_loader = None
        self._pseudo_batches = iter(())
        self._pseudo_losses: list[float] = []
        generator = torch.Generator().manual_seed(self.args.seed)
        self.target_loader = DataLoader(target_features, batch_size=self.args.per_device_train_batch_size,
                                        shuffle=True, collate_fn=self.data_collator, generator=generator)
        self._target_batches = iter(())
        method = adaptation_method(adaptation.method)
        self.alignment = method.term(adaptation, hidden_size, self._device()) if method.aligns else None
        self.model_accepts_loss_kwargs = False  # our loss is a mean already: let Trainer scale for accumulation
        self._da_losses: list[float] = []

    def extra_state(self) -> dict[str, torch.nn.Module]:
        return self.alignment.modules() if self.alignment is not None else {}

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        for module in self.extra_state().values():  # trained alongside the adapter, saved nowhere
            optimizer.add_param_group({"params": list(module.parameters()), "weight_decay": 0.0})
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
        aligning = self.alignment is not None
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
        step = TermInputs(source=pooled_features(outputs, attention_mask, self.task),
                          target=pooled_features(target_outputs, target["attention_mask"], self.task),
                          target_logits=target_outputs.logits if self.task == "classification" else None,
                          progress=self.state.global_step / max(1, self.state.max_steps))
        return self.alignment(step)

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
        self._pseudo_loader = None
        self._pseudo_batches = iter(())
        if self._stopped:
            return
        try:  # in eval mode (no dropout), then back to training for the rest of this step
            probabilities = predict_probabilities(model, self.target_features, self.data_collator.pad_token_id,
                                                  self.args.per_device_eval_batch_size)
        finally:
            model.train()
        now = probabilities.argmax(-1)
        if self._reference_labels is None:
            self._reference_labels = now
        agreement, stop = drift(now, self._reference_labels, probabilities.shape[-1], spec)
        rows, labels = [], []
        thresholds = class_thresholds(probabilities, spec.threshold, spec.thresholds)
        if stop is None:
            rows, labels = select_pseudo_labels(probabilities, thresholds, spec.balance,
                                                now == self._reference_labels if spec.agree else None)
        confidences = [float(probabilities[r].max()) for r in rows]
        chosen = PseudoLabels(self.state.global_step, rows, labels, confidences, len(self.target_features), agreement,
                              stop, [round(float(t), 4) for t in thresholds])
        self.pseudo_label_rounds.append(chosen)
        self._report(chosen, probabilities.shape[-1])
        if rows:
            chosen = [self.target_features[r] | {"labels": label} for r, label in zip(rows, labels)]
            generator = torch.Generator().manual_seed(self.args.seed + len(self.pseudo_label_rounds))
            self._pseudo_loader = DataLoader(chosen, batch_size=self.args.per_device_train_batch_size, shuffle=True,
                                             collate_fn=self.data_collator, generator=generator)

    def _report(self, chosen: PseudoLabels, num_labels: int) -> None:
        """One line per round; a warning when it teaches nothing, and why."""
        spec = self.adaptation.self_training
        summary = chosen.summary(num_labels)
        number = len(self.pseudo_label_rounds)
        mean = f", mean confidence {summary['mean_confidence']:.2f}" if chosen.rows else ""
        print(f"self-training round {number}/{spec.rounds} at step {chosen.step}: kept {len(chosen.rows)} of "
              f"{chosen.candidates} target rows {summary['per_class']}{mean}, agreement with the warm-up labeller "
              f"{chosen.agreement:.0%}" + (f", thresholds {summary['thresholds']}" if spec.thresholds != "fixed" else ""),
              flush=True)
        if chosen.stopped:
            self._stopped = True
            log.warning("self-training stopped at round %d: %s; the adapter keeps what it learned before", number,
                        chosen.stopped)
        elif not chosen.rows:
            log.warning("self-training round %d kept no target row: none reached the threshold %s%s; this round "
                        "teaches nothing%s: lower `threshold` or train longer", number, spec.threshold,
                        " in every class with the labellers agreeing" if spec.balance or spec.agree else "",
                        " and the adapter equals source-only" if all(not r.rows for r in self.pseudo_label_rounds)
                        and number == spec.rounds else "")

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
