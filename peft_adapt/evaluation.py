"""Evaluate a model on tokenized examples: perplexity for causal LM, accuracy and macro-F1 for classification."""

from __future__ import annotations

import torch

from pathlib import Path

from .data import IGNORE_INDEX, LabelMap, TaskSpec, pad_batch, read_eval_file, tokenize
from .metrics import classification_metrics, entity_metrics, perplexity


def nll_per_row(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[batch, 2]: summed next-token negative log-likelihood and the number of predicted tokens per row."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    counted = shift_labels != IGNORE_INDEX
    return torch.stack([(nll * counted).sum(1), counted.sum(1).to(nll.dtype)], dim=1)


def _batches(features: list[dict], batch_size: int, pad_token_id: int, device):
    for start in range(0, len(features), batch_size):
        batch = pad_batch(features[start : start + batch_size], pad_token_id)
        yield {k: v.to(device) for k, v in batch.items()}


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_causal_lm(model, features: list[dict], pad_token_id: int, batch_size: int = 8) -> dict:
    """Token-weighted loss and perplexity over every predicted (non-masked) token."""
    model.eval()
    device = _device_of(model)
    total_nll, total_tokens = 0.0, 0
    for batch in _batches(features, batch_size, pad_token_id, device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums = nll_per_row(logits, batch["labels"]).sum(0)
        total_nll += sums[0].item()
        total_tokens += int(sums[1].item())
    return {"loss": total_nll / total_tokens, "perplexity": perplexity(total_nll, total_tokens), "tokens": total_tokens}


@torch.no_grad()
def predict_classes(model, features: list[dict], pad_token_id: int, batch_size: int = 32) -> list[int]:
    model.eval()
    device = _device_of(model)
    predictions: list[int] = []
    for batch in _batches(features, batch_size, pad_token_id, device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predictions += logits.argmax(-1).tolist()
    return predictions


def evaluate_classification(model, features: list[dict], pad_token_id: int, num_labels: int, batch_size: int = 32) -> dict:
    predictions = predict_classes(model, features, pad_token_id, batch_size)
    labels = [f["labels"] for f in features]
    return classification_metrics(predictions, labels, num_labels) | {"examples": len(labels)}


@torch.no_grad()
def evaluate_token_classification(model, features: list[dict], pad_token_id: int, tag_names: list[str],
                                  batch_size: int = 32) -> dict:
    """Entity-level precision, recall and F1 over words (a word's tag is its first sub-token's; words cut
    off by max_length count as predicted `O`), and word accuracy."""
    model.eval()
    device = _device_of(model)
    predicted_tags, gold_tags = [], []
    for start in range(0, len(features), batch_size):
        chunk = features[start : start + batch_size]
        batch = {k: v.to(device) for k, v in pad_batch(chunk, pad_token_id).items()}
        best = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1).tolist()
        for f, row in zip(chunk, best):
            words = ["O"] * f["n_words"]
            for position, word in enumerate(f["word_ids"]):
                if word >= 0:
                    words[word] = tag_names[row[position]]
            predicted_tags.append(words)
            gold_tags.append([tag_names[t] for t in f["word_tags"]])
    pairs = [(p, g) for ps, gs in zip(predicted_tags, gold_tags) for p, g in zip(ps, gs)]
    return entity_metrics(predicted_tags, gold_tags) | {
        "word_accuracy": sum(p == g for p, g in pairs) / len(pairs), "sentences": len(features)}


def evaluate_task(model, features: list[dict], task_type: str, pad_token_id: int, num_labels: int | None = None,
                  batch_size: int = 8, label_names: list[str] | None = None) -> dict:
    if task_type == "causal_lm":
        return evaluate_causal_lm(model, features, pad_token_id, batch_size)
    if task_type == "token_classification":
        return evaluate_token_classification(model, features, pad_token_id, label_names, batch_size)
    return evaluate_classification(model, features, pad_token_id, num_labels, batch_size)


def evaluate_file(adapter_dir: str | Path, data_file: str | Path, quantization: str | None = None,
                  device: str = "auto", batch_size: int = 16, max_rows: int | None = None,
                  force: bool = False) -> dict:
    """Load a trained adapter onto its base and score it on a data file."""
    from .loading import load_trained
    from .manifest import read_manifest

    manifest = read_manifest(adapter_dir)
    task = TaskSpec.model_validate(manifest["recipe"]["task"])
    names = manifest.get("labels")
    examples = read_eval_file(task, Path(data_file), LabelMap(names) if names else None, max_rows)
    loaded = load_trained(adapter_dir, quantization=quantization, device=device, force=force)
    features = tokenize(examples, loaded.backbone.tokenizer, task)
    pad = loaded.backbone.tokenizer.pad_token_id
    return evaluate_task(loaded.model, features, task.type, pad, len(names) if names else None, batch_size, names)
