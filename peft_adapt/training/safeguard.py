"""The safeguard after domain adaptation: the source-only adapter is trained too (same recipe and seed, no
`domain_adaptation:`), both are judged by label-free criteria (`adaptation/selection.py`) on the source's held-out
rows and the target's unlabeled text, and the adapted adapter is kept only when the criteria say it is better.
No target label is read: the target's text comes through `read_target_texts`, which reads nothing else."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adaptation.features import feature_kwargs, pooled_features
from ..adaptation.selection import Outputs, choose_among, criteria, domain_weights, source_drop_p
from ..data.collate import pad_batch
from ..errors import UserInputError

# The criteria read at most this many rows of each side, a seeded sample the same for every model judged. SND
# compares every target prediction with every other (rows x rows), and each model judged runs over every row: on a
# target of 100k rows that is a 40 GB matrix and hours of passes. The DEV and sign-test noise at 4000 rows is well
# under the differences the safeguard decides on; every run here judged fewer rows and is unchanged by the cap.
JUDGE_ROWS = 4000


def sample_rows(rows: list[dict], limit: int | None = None, seed: int = 0) -> list[dict]:
    """All rows when there are at most `limit` (JUDGE_ROWS), else `limit` of them drawn without replacement, in
    their order."""
    limit = JUDGE_ROWS if limit is None else limit
    if len(rows) <= limit:
        return rows
    picked = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return [rows[i] for i in picked.tolist()]


@dataclass
class Judgement:
    selected: str  # "adapted", "source_only", or (select: auto) the label of the variant kept
    why: str
    criteria: dict  # {"adapted": {...}, "source_only": {...}}
    source_only: object = None  # the source-only TrainResult (its model, metrics, folder)
    outputs: dict | None = None  # {name: Outputs}: what the criteria were read from (benchmarks read more of it)

    def record(self, method: str) -> dict:
        """What metrics.json says of it (`domain_adaptation`)."""
        record = {"method": method, "safeguard": True, "selected": self.selected, "why": self.why,
                  "criteria": self.criteria}
        if self.source_only is not None:
            record["source_only_metrics"] = {k: v for k, v in self.source_only.metrics.items() if k in ("eval", "test")}
        return record


@torch.no_grad()
def _probs_and_features(model, rows: list[dict], pad_token_id: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    device = next(model.parameters()).device
    probs, features = [], []
    for start in range(0, len(rows), batch_size):
        batch = pad_batch([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows[start : start + batch_size]],
                          pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch, **feature_kwargs("classification"))
        probs.append(out.logits.float().softmax(-1).cpu())
        features.append(pooled_features(out, batch["attention_mask"], "classification").cpu())
    return torch.cat(probs), torch.cat(features)


def outputs_of(model, source_rows: list[dict], target_rows: list[dict], pad_token_id: int, batch_size: int,
               base: tuple | None = None, class_labels: torch.Tensor | None = None) -> Outputs:
    source_probs, source_features = _probs_and_features(model, source_rows, pad_token_id, batch_size)
    target_probs, target_features = _probs_and_features(model, target_rows, pad_token_id, batch_size)
    labels = torch.tensor([r["labels"] for r in source_rows])
    return Outputs(source_probs, labels, source_features, target_probs, target_features, *(base or (None, None)),
                   class_labels)


def base_features(model, source_rows: list[dict], target_rows: list[dict], pad_token_id: int,
                  batch_size: int) -> tuple | None:
    """Both sides' features with the adapter off (a peft model's `disable_adapter`), or None for a model that has
    no such switch (bottleneck and prefix adapters): then `reverse_accuracy` is not reported."""
    switch = getattr(model, "disable_adapter", None)
    if switch is None:
        return None
    with switch():
        return tuple(_probs_and_features(model, rows, pad_token_id, batch_size)[1]
                     for rows in (source_rows, target_rows))


def judge(adapted_model, source_only_model, source_rows: list[dict], target_rows: list[dict], pad_token_id: int,
          batch_size: int = 32, variants: dict | None = None, class_labels: list[int] | None = None) -> Judgement:
    """Compare an adapted classifier (and, for `select: auto`, the `variants` {label: model} trained with other
    settings) with the source-only one on the source's held-out rows and the target's text. `class_labels`: every
    labelled source row's label, whose shares `prior_gap` reads (`source_labels`); the held-out rows' if None."""
    if not source_rows:
        raise UserInputError("the safeguard needs the source domain's held-out rows (an eval file, or "
                             "task.eval_fraction above 0); or turn it off: domain_adaptation.safeguard: false")
    models = {"adapted": adapted_model, **(variants or {}), "source_only": source_only_model}
    source_rows, target_rows = sample_rows(source_rows), sample_rows(target_rows)
    base = base_features(source_only_model, source_rows, target_rows, pad_token_id, batch_size)
    shares_of = torch.tensor(class_labels) if class_labels else None  # one tensor for every model judged
    outputs = {name: outputs_of(model, source_rows, target_rows, pad_token_id, batch_size, base, shares_of)
               for name, model in models.items()}
    base_weights = domain_weights(*base) if base else None  # one space for every model judged
    found = {name: criteria(out, base_weights) for name, out in outputs.items()}
    for name in found.keys() - {"source_only"}:
        found[name]["source_drop_p"] = source_drop_p(outputs[name], outputs["source_only"])
    candidates = {name: c for name, c in found.items() if name != "source_only"}
    selected, why = choose_among(candidates, found["source_only"])
    return Judgement(selected, why, found, outputs=outputs)


def source_labels(data) -> list[int]:
    """Every labelled source row's class (a DomainData's training and held-out rows): the class shares the
    safeguard's `prior_gap` compares the target predictions with."""
    return [row["labels"] for row in [*data.train, *(data.eval or [])]]


def train_source_only(recipe, domain: str, out_root: Path, train, registry=None):
    """The same recipe and seed without `domain_adaptation:`, trained into a hidden folder beside the output (the
    caller removes it): the adapter the adapted one must beat."""
    plain = recipe.model_copy(update={"domain_adaptation": None})
    folder = Path(out_root) / f".{domain}.source-only"
    shutil.rmtree(folder, ignore_errors=True)
    return train(plain, domain, folder, registry=registry), folder
