"""A classifier's head beside its exported encoder: `head.safetensors` (the linear layer, and a CRF's scores),
`head.json` (task, labels, pooling, max_length) and a README whose snippet runs the two with transformers alone.

transformers' own `*ForSequenceClassification` classes put a dense layer and an activation (BERT's pooler,
RoBERTa's classification head, DeBERTa's context pooler) or no bias (Llama's `score`) between the pooled state and
the labels; the heads trained here are one linear layer on the pooled state, so none of them computes what was
trained. The exported folder is a plain `AutoModel` checkpoint and the head is a few lines, written out in full.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..formats import Manifest, write_json
from ..models.crf import bio_constraints

HEAD_WEIGHTS, HEAD_CONFIG, CARD = "head.safetensors", "head.json", "README.md"

# what both snippets begin with: the encoder, its tokenizer and the head
_LOADING = '''
import json, torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

folder = "FOLDER"
model = AutoModel.from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
head, spec = load_file(f"{folder}/head.safetensors"), json.load(open(f"{folder}/head.json"))
'''

_SEQUENCE = _LOADING + '''

def classify(texts: list[str]) -> list[dict]:
    tokenizer.padding_side = "right"
    enc = tokenizer(texts, padding=True, truncation=True, max_length=spec["max_length"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state.float()
    mask = enc["attention_mask"]
    if spec["pooling"] == "mean":
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    else:  # "cls": the first token; "last": the last real one (a decoder)
        at = torch.zeros_like(mask[:, 0]) if spec["pooling"] == "cls" else mask.sum(1) - 1
        pooled = hidden[torch.arange(len(hidden)), at]
    probs = (pooled @ head["weight"].T + head["bias"]).softmax(-1)
    return [{"label": spec["labels"][int(p.argmax())], "probs": dict(zip(spec["labels"], p.tolist()))} for p in probs]
'''

_TOKENS = _LOADING + '''

def tag(words: list[str]) -> list[str]:
    """A tag per word (its first sub-token's); words past max_length get none."""
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=spec["max_length"],
                    return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state[0].float()
    ids = enc.word_ids()
    starts = [i for i, w in enumerate(ids) if w is not None and (i == 0 or ids[i - 1] != w)]
    scores = hidden[starts] @ head["weight"].T + head["bias"]  # [words, tags]
    if "crf.transitions" not in head:
        return [spec["labels"][t] for t in scores.argmax(-1).tolist()]
    # Viterbi through the CRF (its scores saved with BIO's forbidden moves already applied)
    best, back = head["crf.start"] + scores[0], []
    for emission in scores[1:]:
        step = best.unsqueeze(1) + head["crf.transitions"]
        best, came_from = step.max(0)
        best, back = best + emission, back + [came_from]
    path = [int((best + head["crf.end"]).argmax())]
    for came_from in reversed(back):
        path.append(int(came_from[path[-1]]))
    return [spec["labels"][t] for t in reversed(path)]
'''


def snippet(task: str, folder: str = "FOLDER") -> str:
    """The Python that runs an exported classifier with transformers alone (`folder`: where it lies)."""
    return (_TOKENS if task == "token_classification" else _SEQUENCE).strip().replace('"FOLDER"', repr(folder))


def write_head(folder: Path, head: dict[str, torch.Tensor], manifest: Manifest, ref: str) -> None:
    """The head files and the README that shows how to run them."""
    from safetensors.torch import save_file

    labels = manifest.labels or [str(k) for k in range(head["weight"].shape[0])]
    saved = {k: v.float().contiguous() for k, v in head.items()}
    if "crf.transitions" in saved:  # BIO's forbidden moves are buffers of the CRF, not saved: applied here
        start, moves = bio_constraints(labels)
        saved["crf.start"] = saved["crf.start"] + start
        saved["crf.transitions"] = saved["crf.transitions"] + moves
    save_file(saved, str(folder / HEAD_WEIGHTS))
    pooling = manifest.pooling or "mean"
    write_json(folder / HEAD_CONFIG, {"task": manifest.task, "labels": labels, "pooling": pooling,
                                      "max_length": manifest.max_length, "crf": "crf.transitions" in saved,
                                      "adapter": ref})
    what = "a tag per word" if manifest.task == "token_classification" else f"a label per text ({pooling} pooling)"
    (folder / CARD).write_text(
        f"# {ref}, exported\n\n{manifest.base_model} with the adapter `{ref}` folded into its weights: a plain "
        f"`AutoModel` checkpoint, and the {manifest.task} head trained with it (`{HEAD_WEIGHTS}`, `{HEAD_CONFIG}`), "
        f"which gives {what}. transformers' own classification classes add layers this head does not have, so the "
        f"head runs as below (torch, safetensors and transformers only):\n\n```python\n{snippet(manifest.task)}\n```\n",
        encoding="utf-8")
