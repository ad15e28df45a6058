"""Evaluate a model on tokenized examples: perplexity for causal LM, accuracy and macro-F1 for classification."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import IGNORE_INDEX, LabelMap, TaskSpec, pad_batch, read_eval_file, tokenize
from ..errors import UserInputError
from ..formats import read_manifest
from ..models.backbone import BaseSpec, load_backbone
from ..runtime.loading import load_trained
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


def masked_nll_per_row(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[rows, 2]: summed negative log-likelihood of each row's masked tokens (labels not IGNORE_INDEX), and their count."""
    nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    counted = labels != IGNORE_INDEX
    return torch.stack([(nll * counted).sum(1), counted.sum(1).to(nll.dtype)], dim=1)


def _indexed_batches(features: list[dict], batch_size: int, pad_token_id: int, device):
    for start in range(0, len(features), batch_size):
        batch = pad_batch(features[start : start + batch_size], pad_token_id)
        yield start, {k: v.to(device) for k, v in batch.items()}


def _batches(features: list[dict], batch_size: int, pad_token_id: int, device):
    for _, batch in _indexed_batches(features, batch_size, pad_token_id, device):
        yield batch


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_causal_lm(model, features: list[dict], pad_token_id: int, batch_size: int = 8,
                       records: list | None = None, nll=nll_per_row) -> dict:
    """Token-weighted loss and perplexity over every predicted (non-masked) token; `records` gets one entry per row.
    `nll`: masked_nll_per_row scores a masked LM (its masked tokens, unshifted)."""
    model.eval()
    device = _device_of(model)
    total_nll, total_tokens = 0.0, 0
    for start, batch in _indexed_batches(features, batch_size, pad_token_id, device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_row = nll(logits, batch["labels"])
        if records is not None:
            for f, (nll, count) in zip(features[start : start + batch_size], per_row.tolist()):
                records.append({"row": f.get("row"), "tokens": int(count), "loss": nll / max(count, 1),
                                "perplexity": perplexity(nll, int(count)) if count else None})
        sums = per_row.sum(0)
        total_nll += sums[0].item()
        total_tokens += int(sums[1].item())
    return {"loss": total_nll / total_tokens, "perplexity": perplexity(total_nll, total_tokens), "tokens": total_tokens}


@torch.no_grad()
def predict_probabilities(model, features: list[dict], pad_token_id: int, batch_size: int = 32) -> torch.Tensor:
    """[rows, classes] class probabilities."""
    model.eval()
    device = _device_of(model)
    parts = []
    for batch in _batches(features, batch_size, pad_token_id, device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        parts.append(logits.float().softmax(-1).cpu())
    return torch.cat(parts)


def evaluate_classification(model, features: list[dict], pad_token_id: int, num_labels: int, batch_size: int = 32,
                            label_names: list[str] | None = None, records: list | None = None) -> dict:
    probs = predict_probabilities(model, features, pad_token_id, batch_size)
    predictions = probs.argmax(-1).tolist()
    labels = [f["labels"] for f in features]
    if records is not None:
        names = label_names or [str(i) for i in range(probs.shape[-1])]
        for f, p, predicted in zip(features, probs.tolist(), predictions):
            records.append({"row": f.get("row"), "label": names[predicted], "label_id": predicted,
                            "gold": names[f["labels"]], "probs": dict(zip(names, p))})
    return classification_metrics(predictions, labels, num_labels) | {"examples": len(labels)}


@torch.no_grad()
def evaluate_token_classification(model, features: list[dict], pad_token_id: int, tag_names: list[str],
                                  batch_size: int = 32, records: list | None = None) -> dict:
    """Entity-level precision, recall and F1 over words (a word's tag is its first sub-token's; words cut
    off by max_length count as predicted `O`), and word accuracy."""
    model.eval()
    device = _device_of(model)
    predicted_tags, gold_tags = [], []
    for start in range(0, len(features), batch_size):
        chunk = features[start : start + batch_size]
        batch = {k: v.to(device) for k, v in pad_batch(chunk, pad_token_id).items()}
        # with the labels a CRF head knows the word starts and decodes them (Viterbi); a softmax head ignores them
        best = model(**batch).logits.argmax(-1).tolist()
        for f, row in zip(chunk, best):
            words = ["O"] * f["n_words"]
            for position, word in enumerate(f["word_ids"]):
                if word >= 0:
                    words[word] = tag_names[row[position]]
            predicted_tags.append(words)
            gold_tags.append([tag_names[t] for t in f["word_tags"]])
            if records is not None:
                records.append({"row": f.get("row"), "tags": words, "gold": gold_tags[-1]})
    pairs = [(p, g) for ps, gs in zip(predicted_tags, gold_tags) for p, g in zip(ps, gs)]
    return entity_metrics(predicted_tags, gold_tags) | {
        "word_accuracy": sum(p == g for p, g in pairs) / len(pairs), "sentences": len(features)}


def rouge_l(found: list, expected: list) -> float:
    """ROUGE-L F1 (Lin 2004): the longest common subsequence's share of both sequences, harmonically meaned."""
    if not found or not expected:
        return float(found == expected)
    previous = [0] * (len(expected) + 1)
    for a in found:
        current = [0]
        for j, b in enumerate(expected):
            current.append(previous[j] + 1 if a == b else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    return 0.0 if common == 0 else 2 * common / (len(found) + len(expected))


@torch.no_grad()
def evaluate_seq2seq(model, features: list[dict], pad_token_id: int, eos_token_id: int | None, batch_size: int = 8,
                     records: list | None = None) -> dict:
    """Teacher-forced loss and perplexity over the targets' tokens, and greedy generation scored against the
    targets: exact match and ROUGE-L F1, both over token ids (the target's tokens, EOS left out)."""
    model.eval()
    device = _device_of(model)
    total_nll, total_tokens, exact, rouge = 0.0, 0, 0, 0.0
    for start, batch in _indexed_batches(features, batch_size, pad_token_id, device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
        per_row = masked_nll_per_row(logits, batch["labels"])
        generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   max_new_tokens=batch["labels"].shape[1] + 1, do_sample=False, num_beams=1)
        for i, f in enumerate(features[start : start + batch_size]):
            target = [t for t in f["labels"] if t != eos_token_id]
            found = [t for t in generated[i, 1:].tolist()]  # after the decoder's start token
            found = found[: found.index(eos_token_id)] if eos_token_id in found else found
            found = [t for t in found if t != pad_token_id]
            exact += found == target
            rouge += (score := rouge_l(found, target))
            if records is not None:
                nll, count = per_row[i].tolist()
                records.append({"row": f.get("row"), "generated_ids": found, "exact_match": found == target,
                                "rouge_l": score, "loss": nll / max(count, 1)})
        sums = per_row.sum(0)
        total_nll += sums[0].item()
        total_tokens += int(sums[1].item())
    return {"loss": total_nll / total_tokens, "perplexity": perplexity(total_nll, total_tokens),
            "exact_match": exact / len(features), "rouge_l": rouge / len(features), "tokens": total_tokens}


def evaluate_task(model, features: list[dict], task_type: str, pad_token_id: int, num_labels: int | None = None,
                  batch_size: int = 8, label_names: list[str] | None = None, records: list | None = None) -> dict:
    if task_type == "causal_lm":
        return evaluate_causal_lm(model, features, pad_token_id, batch_size, records)
    if task_type == "masked_lm":
        return evaluate_causal_lm(model, features, pad_token_id, batch_size, records, nll=masked_nll_per_row)
    if task_type == "token_classification":
        return evaluate_token_classification(model, features, pad_token_id, label_names, batch_size, records)
    if task_type == "seq2seq":
        eos = model.config.eos_token_id
        return evaluate_seq2seq(model, features, pad_token_id, eos[0] if isinstance(eos, list) else eos, batch_size,
                                records)
    return evaluate_classification(model, features, pad_token_id, num_labels, batch_size, label_names, records)


def evaluate_file(adapter_dir: str | Path, data_file: str | Path, quantization: str | None = None,
                  device: str = "auto", batch_size: int = 16, max_rows: int | None = None,
                  force: bool = False, base_only: bool = False, records: list | None = None,
                  source: str | None = None, registry=None) -> dict:
    """Load a trained adapter onto its base and score it on a data file; `base_only` scores its base alone
    (causal LM: the perplexity an adapter is measured against). `records` gets one entry per example."""

    manifest = read_manifest(adapter_dir)
    task = TaskSpec.model_validate(manifest.task_spec)
    names = manifest.labels
    examples = read_eval_file(task, Path(data_file), LabelMap(names) if names else None, max_rows)
    if base_only:
        if task.type not in ("causal_lm", "seq2seq"):
            raise UserInputError(f"{source or adapter_dir} is a {task.type} adapter: its base has no head to score "
                                 f"without it; --base-only measures causal LM and seq2seq bases")
        base = manifest.base
        updates = {"device": device} | ({"quantization": quantization} if quantization else {})
        backbone = load_backbone(base.model_copy(update=updates), task.type)
        model = backbone.model
    else:
        loaded = load_trained(adapter_dir, quantization=quantization, device=device, force=force, source=source,
                              registry=registry)
        backbone, model = loaded.backbone, loaded.model
    features = tokenize(examples, backbone.tokenizer, task)
    pad = backbone.tokenizer.pad_token_id
    return evaluate_task(model, features, task.type, pad, len(names) if names else None, batch_size, names, records)


def evaluate_base_model(model: str, data_file: str | Path, quantization: str = "nf4", device: str = "auto",
                        batch_size: int = 16, max_rows: int | None = None, max_length: int = 256,
                        records: list | None = None) -> dict:
    """Perplexity of a causal LM base on a data file, with no adapter."""
    task = TaskSpec(type="causal_lm", max_length=max_length)
    examples = read_eval_file(task, Path(data_file), None, max_rows)
    backbone = load_backbone(BaseSpec(model=model, quantization=quantization, device=device), "causal_lm")
    features = tokenize(examples, backbone.tokenizer, task)
    return evaluate_causal_lm(backbone.model, features, backbone.tokenizer.pad_token_id, batch_size, records)
