"""Read examples from JSONL, CSV, Parquet or saved `datasets` folders, validate them, tokenize per task.

Every error names the file and the row (1-based, counting data rows; for JSONL the line number).
Tasks:
- `causal_lm`: a `text` field, or `prompt` + `completion` with the loss on the completion only;
  optional packing of all examples into blocks of `max_length` tokens.
- `classification`: `text` + `label` (an integer id or a name) or `label_name`.
- `token_classification`: `tokens` (a list of words) + `tags` (one BIO tag per word); each word's tag
  goes on its first sub-word token, the others are left out of the loss.
- `masked_lm`: a `text` field (any other field, a label included, is never read); a share of the tokens is
  masked and predicted. Training masks afresh in every batch (`MaskingCollator`); eval and test rows are masked
  once, seeded, so every evaluation scores the same positions.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import UserInputError

IGNORE_INDEX = -100  # label id the loss skips (prompt tokens, padding)


class TaskSpec(BaseModel):
    """The `task:` section of a recipe."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["causal_lm", "classification", "token_classification", "masked_lm"] = Field(
        json_schema_extra={"example": "classification"})
    max_length: int = Field(256, ge=8, description="tokens per example: longer ones are cut (packing: split)")
    packing: bool = Field(False, description="causal_lm: pack examples into max_length blocks")
    pooling: Literal["auto", "mean", "cls", "last"] = Field(
        "auto", description="classification: auto (as the encoder was trained) | mean | cls | last")
    text_field: str = Field("text", description="the field that holds the text")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="carved from train when a domain has no eval file; 0: none")
    mask_probability: float = Field(0.15, gt=0, lt=1, description="masked_lm: the share of tokens masked and predicted")
    crf: bool = Field(False, description="token_classification: a CRF output layer (BIO enforced, Viterbi decoding)")

    @model_validator(mode="after")
    def _crf_tags_words(self):
        if self.crf and self.type != "token_classification":
            raise ValueError(f"task.crf is an output layer over word tags; task {self.type} has none: remove crf")
        return self


# ---------------------------------------------------------------- reading


def read_utf8(path: Path) -> str:
    """A text file's content; a byte that is not UTF-8 is named with its line, instead of a traceback."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserInputError(f"{path}: line {line}: byte {raw[exc.start]:#x} is not UTF-8; save the file as UTF-8") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    # lines end at "\n" only: a stray "\r" or U+2028 inside a line must not split a record
    for line_no, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path}: line {line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserInputError(f"{path}: line {line_no}: expected a JSON object, found {type(row).__name__}")
        rows.append((line_no, row))
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    import io

    reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""))
    # row numbers count data rows; the header is row 0
    return [(i, dict(row)) for i, row in enumerate(reader, start=1)]


def _read_parquet(path: Path) -> list[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise UserInputError(f"{path}: not a readable Parquet file ({exc})") from None
    return list(enumerate(table.to_pylist(), start=1))


def _read_datasets_folder(path: Path, split: str) -> list[tuple[int, dict]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise UserInputError(f"{path}: not a saved `datasets` folder ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        preference = {"train": ["train"], "eval": ["validation", "eval", "test"], "test": ["test"]}[split]
        names = [n for n in preference if n in loaded] or (list(loaded) if len(loaded) == 1 else [])
        if not names:
            raise UserInputError(
                f"{path}: a DatasetDict with splits {list(loaded)} and none of {preference} for the {split} "
                f"data; save the split you want as its own folder, or rename it"
            )
        loaded = loaded[names[0]]
    return list(enumerate(loaded.to_list(), start=1))


def read_rows(path: str | Path, split: str = "train") -> list[tuple[int, dict]]:
    """(row number, row) pairs from a data file or folder; `split` picks a DatasetDict split."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"data file {path} does not exist")
    if path.is_dir():
        rows = _read_datasets_folder(path, split)
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        rows = _read_jsonl(path)
    elif path.suffix == ".csv":
        rows = _read_csv(path)
    elif path.suffix in (".parquet", ".pq"):
        rows = _read_parquet(path)
    else:
        raise UserInputError(
            f"{path}: unknown data format {path.suffix!r}; use .jsonl, .csv, .parquet or a saved `datasets` folder"
        )
    if not rows:
        raise UserInputError(f"{path}: the dataset is empty (no rows); add examples or point to another file")
    return rows


DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", ".csv", ".parquet", ".pq")


def read_texts(path: str | Path, text_field: str = "text") -> list[tuple[int | str, str]]:
    """(id, text) pairs to run a model on: a data file's rows (`text_field`; the id is the row's `id` field or its
    row number), or a plain text file with one text per line, split on "\\n" only (a "\\r" inside a line, form
    feeds and Unicode line separators stay part of the text), its ids the line numbers. Blank lines are skipped."""
    path = Path(path)
    if path.is_dir() or path.suffix in DATA_SUFFIXES:
        return [(row.get("id", n) if isinstance(row.get("id"), (int, str)) else n, text_of(row, text_field, f"row {n}", path))
                for n, row in read_rows(path, "test")]
    if not path.is_file():
        raise UserInputError(f"input file {path} does not exist")
    lines = read_utf8(path).split("\n")
    items = [(n, line[:-1] if line.endswith("\r") else line) for n, line in enumerate(lines, start=1)]
    items = [(n, text) for n, text in items if text.strip()]
    if not items:
        raise UserInputError(f"{path}: no text in the file (every line is blank)")
    return items


def file_sha256(path: str | Path) -> str:
    """Hash of a data file, or of every file in a `datasets` folder, for the manifest."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- examples


@dataclass
class Example:
    row: int
    text: str = ""
    prompt: str | None = None
    completion: str | None = None
    label: int | None = None
    words: list[str] | None = None  # token classification: the words and their tag ids
    tags: list[int] | None = None
    messages: list[dict] | None = None  # chat: [{role, content}, ...], the loss on assistant turns only


@dataclass
class LabelMap:
    """Class names by id. Built from the training data, saved with the adapter."""

    names: list[str] = field(default_factory=list)

    def id_of(self, value, where: str) -> int:
        if isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
            index = int(value)
            if 0 <= index < len(self.names):
                return index
        elif value in self.names:
            return self.names.index(value)
        raise UserInputError(
            f"{where}: label {value!r} is outside the label map {self._describe()} built from the training data; "
            f"fix the row or add the class to the training data"
        )

    def _describe(self) -> str:
        return "{" + ", ".join(f"{i}: {n!r}" for i, n in enumerate(self.names)) + "}"


def text_of(row: dict, key: str, where: str, source: Path) -> str:
    if key not in row:
        raise UserInputError(f"{source}: {where}: missing field {key!r} (fields found: {sorted(row)})")
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise UserInputError(f"{source}: {where}: field {key!r} must be a non-empty string, found {value!r}")
    return value


def _is_int_label(value) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())


def build_tag_map(rows: list[tuple[int, dict]], source: Path) -> LabelMap:
    """BIO tags sorted with `O` first, so id 0 is "outside any entity"."""
    tags = set()
    for row_no, row in rows:
        words, row_tags = row.get("tokens"), row.get("tags")
        if not isinstance(words, list) or not isinstance(row_tags, list):
            raise UserInputError(f"{source}: row {row_no}: token classification needs lists `tokens` and `tags` "
                                 f"(fields found: {sorted(row)})")
        tags.update(map(str, row_tags))
    return LabelMap(sorted(tags, key=lambda t: (t != "O", t)))


def label_value(row: dict, where: str):
    """A row's label: `label` (an integer id or a name), else `label_name`; null, floats and lists are refused."""
    key = "label" if row.get("label") is not None else "label_name"
    value = row.get(key)
    if value is None:
        present = [k for k in ("label", "label_name") if k in row]
        if present:
            raise UserInputError(f"{where}: {' and '.join(present)} {'is' if len(present) == 1 else 'are'} null; "
                                 f"give each row a label")
        raise UserInputError(f"{where}: missing field 'label' or 'label_name' (fields found: {sorted(row)})")
    if isinstance(value, float):
        if value.is_integer():
            raise UserInputError(f"{where}: label {value!r} is a number with a fraction part; write the id as an "
                                 f"integer ({int(value)}) or use a name")
        raise UserInputError(f"{where}: label {value!r} is a fraction; classification labels are integer ids or names")
    if not isinstance(value, (int, str)) or isinstance(value, bool):
        raise UserInputError(f"{where}: label {value!r} is a {type(value).__name__}; use an integer id or a name")
    return value


def build_label_map(rows: list[tuple[int, dict]], source: Path) -> LabelMap:
    """Integer labels keep their ids (names from `label_name` where given); string labels are sorted."""
    ids: dict[int, str] = {}
    names: set[str] = set()
    first_id_row = first_name_row = None
    for row_no, row in rows:
        value = label_value(row, f"{source}: row {row_no}")
        if _is_int_label(value) and row.get("label") is not None:
            index = int(value)
            if index < 0:
                raise UserInputError(f"{source}: row {row_no}: label {value!r} is negative; label ids start at 0")
            ids[index] = str(row.get("label_name", ids.get(index, index)))
            first_id_row = first_id_row or (row_no, value)
        else:
            names.add(str(value))
            first_name_row = first_name_row or (row_no, value)
    if ids and names:
        raise UserInputError(
            f"{source}: labels mix integer ids and names (row {first_id_row[0]} has {first_id_row[1]!r}, row "
            f"{first_name_row[0]} has {first_name_row[1]!r}); use one kind for every row")
    if names:
        return LabelMap(sorted(names))
    return LabelMap([ids.get(i, str(i)) for i in range(max(ids) + 1)])


def parse_examples(
    rows: list[tuple[int, dict]], task: TaskSpec, source: Path, labels: LabelMap | None = None
) -> list[Example]:
    """Validate rows for `task`; classification rows are mapped through `labels`."""
    examples = []
    for row_no, row in rows:
        where = f"row {row_no}"
        if task.type == "causal_lm":
            if task.text_field in row:
                examples.append(Example(row_no, text=text_of(row, task.text_field, where, source)))
            elif "messages" in row:
                examples.append(Example(row_no, messages=chat_messages(row["messages"], f"{source}: {where}")))
            elif "prompt" in row or "completion" in row:
                examples.append(
                    Example(
                        row_no,
                        prompt=text_of(row, "prompt", where, source),
                        completion=text_of(row, "completion", where, source),
                    )
                )
            else:
                raise UserInputError(
                    f"{source}: {where}: missing field {task.text_field!r} (or 'prompt' + 'completion', or "
                    f"'messages'); fields found: {sorted(row)}"
                )
        elif task.type == "masked_lm":  # unlabeled text: whatever else the row holds is not read
            examples.append(Example(row_no, text=text_of(row, task.text_field, where, source)))
        elif task.type == "token_classification":
            words, tags = row.get("tokens"), row.get("tags")
            if not isinstance(words, list) or not isinstance(tags, list) or not words:
                raise UserInputError(f"{source}: {where}: needs non-empty lists `tokens` and `tags` (fields found: {sorted(row)})")
            if len(words) != len(tags):
                raise UserInputError(f"{source}: {where}: {len(words)} tokens but {len(tags)} tags; give one tag per token")
            ids = [labels.id_of(str(tag), f"{source}: {where}") for tag in tags]
            examples.append(Example(row_no, words=[str(w) for w in words], tags=ids))
        else:
            text = text_of(row, task.text_field, where, source)
            value = label_value(row, f"{source}: {where}")
            examples.append(Example(row_no, text=text, label=labels.id_of(value, f"{source}: {where}")))
    return examples


CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def chat_messages(value, where: str) -> list[dict]:
    """A conversation `[{role, content}, ...]` with at least one assistant turn to learn from."""
    if not isinstance(value, list) or not value:
        raise UserInputError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(value):
        if (not isinstance(message, dict) or message.get("role") not in CHAT_ROLES
                or not isinstance(message.get("content"), str)):
            raise UserInputError(f"{where}: messages[{i}] must be {{role: {' | '.join(CHAT_ROLES)}, content: text}}, "
                                 f"found {message!r}"[:400])
    if not any(m["role"] == "assistant" for m in value):
        raise UserInputError(f"{where}: no assistant message: chat training learns the assistant's turns")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the base expects it: its chat template, or `role: content` lines when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant:" if add_generation_prompt else "")


def tokenize_chat(messages: list[dict], tokenizer, where: str) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that keep only the assistant turns (with their
    end-of-turn marks, so the model learns to stop); everything else is IGNORE_INDEX."""
    text = render_chat(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = render_chat(tokenizer, messages[: i + 1])
        if not text.startswith(through) or not through.startswith(before):
            raise UserInputError(f"{where}: the base's chat template does not render this conversation turn by turn, "
                                 f"so its assistant turns cannot be found; train on prompt + completion instead")
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [token if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
              for token, offset in zip(ids, encoded["offset_mapping"])]
    return ids, labels


def split_off_eval(examples: list[Example], fraction: float, seed: int, source: Path) -> tuple[list, list]:
    """Carve an eval split from the training examples (a seeded shuffle; at least one row each)."""
    if len(examples) < 2:
        raise UserInputError(
            f"{source}: {len(examples)} row(s) is too few to carve an eval split; add rows or give an eval file"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    eval_ids = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in eval_ids]
    held = [e for i, e in enumerate(examples) if i in eval_ids]
    return train, held


# ---------------------------------------------------------------- tokenization


def tokenize_causal_lm(examples: list[Example], tokenizer, max_length: int, packing: bool) -> list[dict]:
    """input_ids + labels; prompt tokens are masked out of the loss; packing fills max_length blocks."""
    eos = tokenizer.eos_token_id
    sequences = []
    for ex in examples:
        if ex.messages is not None:  # the template closes each turn itself: no EOS appended
            sequences.append((*tokenize_chat(ex.messages, tokenizer, f"row {ex.row}"), ex.row))
            continue
        if ex.prompt is None:
            ids = tokenizer(ex.text, add_special_tokens=True)["input_ids"]
            labels = list(ids)
        else:
            prompt = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
            completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
            ids = prompt + completion
            labels = [IGNORE_INDEX] * len(prompt) + list(completion)
        if eos is not None:
            ids, labels = ids + [eos], labels + [eos]
        sequences.append((ids, labels, ex.row))
    if not packing:
        features = []
        for ids, labels, row in sequences:
            ids, labels = ids[:max_length], labels[:max_length]
            if any(label != IGNORE_INDEX for label in labels[1:]):
                features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "row": row})
        return features
    flat_ids = [t for ids, _, _ in sequences for t in ids]
    flat_labels = [t for _, labels, _ in sequences for t in labels]
    features = []
    for start in range(0, len(flat_ids), max_length):
        ids, labels = flat_ids[start : start + max_length], flat_labels[start : start + max_length]
        if len(ids) >= 2 and any(label != IGNORE_INDEX for label in labels[1:]):
            features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return features


def tokenize_classification(examples: list[Example], tokenizer, max_length: int) -> list[dict]:
    features = []
    for ex in examples:
        enc = tokenizer(ex.text, truncation=True, max_length=max_length)
        features.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": ex.label,
                         "row": ex.row})
    return features


def tokenize_token_classification(examples: list[Example], tokenizer, max_length: int) -> list[dict]:
    """Each word's tag on its first sub-word token; other sub-words and special tokens get IGNORE_INDEX.
    `word_ids` records which word each token starts (for word-level scoring)."""
    features = []
    for ex in examples:
        enc = tokenizer(ex.words, is_split_into_words=True, truncation=True, max_length=max_length)
        labels, first_of = [], []
        previous = None
        for word in enc.word_ids():
            is_first = word is not None and word != previous
            labels.append(ex.tags[word] if is_first else IGNORE_INDEX)
            first_of.append(word if is_first else -1)
            previous = word
        features.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels,
                         "word_ids": first_of, "n_words": len(ex.words), "word_tags": ex.tags, "row": ex.row})
    return features


def tokenize_masked_lm(examples: list[Example], tokenizer, max_length: int, probability: float | None,
                       seed: int = 0) -> list[dict]:
    """input_ids cut to max_length; with `probability`, masked once (seeded per row: the same positions on every
    run) with `labels` on the masked tokens; without, unmasked, for `MaskingCollator` to mask afresh."""
    import torch

    features = []
    special = set(tokenizer.all_special_ids)
    for index, ex in enumerate(examples):
        enc = tokenizer(ex.text, truncation=True, max_length=max_length)
        feature = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "row": ex.row}
        if probability is not None:
            ids = torch.tensor([enc["input_ids"]])
            maskable = torch.tensor([[t not in special for t in enc["input_ids"]]])
            if not maskable.any():
                continue
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            masked, labels = mask_tokens(ids, maskable, tokenizer, probability, generator)
            feature |= {"input_ids": masked[0].tolist(), "labels": labels[0].tolist()}
        elif len(enc["input_ids"]) < 3:  # nothing but the special tokens: nothing to predict
            continue
        features.append(feature)
    return features


def mask_tokens(ids, maskable, tokenizer, probability: float, generator=None):
    """BERT's masking: each maskable token is chosen with `probability` (at least one per row); of the chosen,
    80% become [MASK], 10% a random token, 10% stay. Returns (masked ids, labels: the original id where chosen)."""
    import torch

    chosen = (torch.rand(ids.shape, generator=generator) < probability) & maskable
    for row in range(ids.shape[0]):  # a row with nothing chosen would teach nothing: choose one of its tokens
        if not chosen[row].any() and maskable[row].any():
            candidates = maskable[row].nonzero().flatten()
            chosen[row, candidates[torch.randint(len(candidates), (1,), generator=generator)]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    draw = torch.rand(ids.shape, generator=generator)
    masked = ids.clone()
    masked[chosen & (draw < 0.8)] = tokenizer.mask_token_id
    swap = chosen & (draw >= 0.8) & (draw < 0.9)
    masked[swap] = torch.randint(len(tokenizer), ids.shape, generator=generator)[swap]
    return masked, labels


def tokenize(examples: list[Example], tokenizer, task: TaskSpec, seed: int = 0) -> list[dict]:
    if task.type == "masked_lm":
        return tokenize_masked_lm(examples, tokenizer, task.max_length, task.mask_probability, seed)
    if task.type == "causal_lm":
        return tokenize_causal_lm(examples, tokenizer, task.max_length, task.packing)
    if task.type == "token_classification":
        return tokenize_token_classification(examples, tokenizer, task.max_length)
    return tokenize_classification(examples, tokenizer, task.max_length)


def pad_batch(features: list[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Collate tokenized features into tensors; labels of padding are IGNORE_INDEX."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    has_labels = "labels" in features[0]  # unlabeled target text for domain adaptation has none
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:  # word bookkeeping of token classification stays out of the batch
        gap = width - len(f["input_ids"])
        pad = lambda seq, value: ([value] * gap + seq) if padding_side == "left" else (seq + [value] * gap)  # noqa: E731
        batch["input_ids"].append(pad(list(f["input_ids"]), pad_token_id))
        batch["attention_mask"].append(pad(list(f["attention_mask"]), 0))
        if has_labels:
            labels = f["labels"]
            batch["labels"].append(labels if isinstance(labels, int) else pad(list(labels), IGNORE_INDEX))
    return {k: torch.tensor(v) for k, v in batch.items() if v}


@dataclass
class Collator:
    pad_token_id: int
    padding_side: str = "right"

    def __call__(self, features: list[dict]) -> dict:
        return pad_batch(features, self.pad_token_id, self.padding_side)


@dataclass
class MaskingCollator:
    """Pads like `Collator`, then masks the rows that carry no labels yet (training rows, masked afresh in every
    batch from torch's seeded generator); rows masked at tokenization (eval, test) are kept as they are."""

    tokenizer: object
    probability: float

    def __call__(self, features: list[dict]) -> dict:
        import torch

        if "labels" in features[0]:
            return pad_batch(features, self.tokenizer.pad_token_id)
        batch = pad_batch(features, self.tokenizer.pad_token_id)
        ids = batch["input_ids"]
        special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)))
        maskable = batch["attention_mask"].bool() & ~torch.isin(ids, special)
        batch["input_ids"], batch["labels"] = mask_tokens(ids, maskable, self.tokenizer, self.probability)
        return batch


@dataclass
class DomainExamples:
    """Validated train / eval (/ test) examples of one domain, with what the manifest records."""

    train: list[Example]
    eval: list[Example]
    test: list[Example] | None
    labels: LabelMap | None
    data_sha256: dict
    paths: dict

    @property
    def n_rows(self) -> dict:
        counts = {"train": len(self.train), "eval": len(self.eval)}
        return counts | ({"test": len(self.test)} if self.test is not None else {})


@dataclass
class DomainData:
    """Tokenized splits of one domain, ready for training and evaluation."""

    train: list[dict]
    eval: list[dict]
    test: list[dict] | None
    examples: DomainExamples

    @property
    def labels(self) -> LabelMap | None:
        return self.examples.labels


def read_domain(
    task: TaskSpec,
    train_path: Path,
    eval_path: Path | None = None,
    test_path: Path | None = None,
    seed: int = 42,
    max_train_rows: int | None = None,
    max_eval_rows: int | None = None,
    shots: int | None = None,
) -> DomainExamples:
    """Read and validate a domain's files; carve an eval split from train when no eval file is given."""
    train_rows = read_rows(train_path, "train")
    labels = {"classification": build_label_map, "token_classification": build_tag_map}.get(task.type)
    labels = labels(train_rows, train_path) if labels else None
    if labels is not None and len(labels.names) < 2:
        raise UserInputError(f"{train_path}: every row has the same label {labels.names}; classification needs 2+ classes")
    train = parse_examples(train_rows, task, train_path, labels)
    if task.type == "classification":
        present = sorted({e.label for e in train})
        if len(present) < 2:
            raise UserInputError(f"{train_path}: every training row has label {labels.names[present[0]]!r}: a classifier "
                                 f"learns nothing from one class; add rows of the other classes")
    if eval_path is not None:
        held = parse_examples(read_rows(eval_path, "eval"), task, eval_path, labels)
    elif task.eval_fraction > 0:
        train, held = split_off_eval(train, task.eval_fraction, seed, train_path)
    else:  # eval_fraction: 0: every row trains, nothing is evaluated during training
        held = []
    test = parse_examples(read_rows(test_path, "test"), task, test_path, labels) if test_path else None
    if max_train_rows:
        train = _subsample(train, max_train_rows, seed)
    if shots:
        train = few_shot(train, shots, seed, labels, train_path)
    if max_eval_rows:
        held = _subsample(held, max_eval_rows, seed)
        test = _subsample(test, max_eval_rows, seed) if test is not None else None
    paths = {"train": train_path, "eval": eval_path, "test": test_path}
    hashes = {name: file_sha256(path) for name, path in paths.items() if path is not None}
    return DomainExamples(train, held, test, labels, hashes, paths)


def read_eval_file(task: TaskSpec, path: Path, labels: LabelMap | None, max_rows: int | None = None) -> list[Example]:
    """Examples of one file to score a trained model on, through the label map saved with it."""
    examples = parse_examples(read_rows(path, "eval"), task, path, labels)
    return examples[:max_rows] if max_rows else examples


def tokenize_domain(examples: DomainExamples, tokenizer, task: TaskSpec) -> DomainData:
    splits = {
        "train": (tokenize_masked_lm(examples.train, tokenizer, task.max_length, None) if task.type == "masked_lm"
                  else tokenize(examples.train, tokenizer, task)),
        "eval": tokenize(examples.eval, tokenizer, task),
        "test": tokenize(examples.test, tokenizer, task) if examples.test is not None else None,
    }
    for name in ("train", "eval"):
        if not splits[name] and (name == "train" or examples.eval):
            path = examples.paths[name] or examples.paths["train"]
            raise UserInputError(
                f"{path}: no {name} example is left after tokenization (each needs 2+ tokens with a label); "
                f"raise task.max_length or check the rows"
            )
    return DomainData(splits["train"], splits["eval"], splits["test"], examples)


def few_shot(examples: list[Example], shots: int, seed: int, labels: LabelMap | None, path: Path) -> list[Example]:
    """Exactly `shots` rows of every class, drawn with the seed, kept in their original order (classification)."""
    if labels is None or examples and examples[0].label is None:
        raise UserInputError(f"training.shots counts rows per class; {path} is not a classification file")
    chosen = []
    rng = random.Random(seed)
    for label_id, name in enumerate(labels.names):
        rows = [i for i, e in enumerate(examples) if e.label == label_id]
        if len(rows) < shots:
            raise UserInputError(f"training.shots: {shots} asks for {shots} rows of class {name!r}; {path} has "
                                 f"{len(rows)} after the eval split: lower shots or add rows")
        chosen += rng.sample(rows, shots)
    return [examples[i] for i in sorted(chosen)]


def _subsample(examples: list[Example], n: int, seed: int) -> list[Example]:
    """A seeded random sample of `n` examples, kept in their original order."""
    if len(examples) <= n:
        return examples
    rng = random.Random(seed)
    picked = rng.sample(range(len(examples)), n)
    return [examples[i] for i in sorted(picked)]
