"""A domain's rows as examples: the recipe's task section, labels and tags, chat messages, eval and few-shot splits."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import UserInputError
from .readers import file_sha256, read_rows, text_of


class TaskSpec(BaseModel):
    """The `task:` section of a recipe."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["causal_lm", "classification", "token_classification", "masked_lm", "seq2seq"] = Field(
        json_schema_extra={"example": "classification"})
    max_length: int = Field(256, ge=8, description="tokens per example: longer ones are cut (packing: split); "
                                                    "seq2seq: per input and per target")
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


INT_LABEL = re.compile(r"-?[0-9]+")
MAX_LABEL_ID = 100_000  # classes a label map may count


@dataclass
class LabelMap:
    """Class names by id. Built from the training data, saved with the adapter."""

    names: list[str] = field(default_factory=list)

    def id_of(self, value, where: str) -> int:
        if _is_int_label(value):
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


def _is_int_label(value) -> bool:
    """An id: an int, or a string of ASCII digits (`'²'` and `'٣'` are digits to str.isdigit, not ids)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and INT_LABEL.fullmatch(value.strip()) is not None)


def check_label_name(value: str, where: str) -> str:
    """A class name is text a person reads: not empty, and not a number written in other digits than 0-9 (which
    would read as an id to one person and a name to another)."""
    if not value.strip():
        raise UserInputError(f"{where}: label {value!r} is empty; give each row a class name or an integer id")
    if value.strip().lstrip("-").isdigit() or value.strip().lstrip("-").isdecimal():
        raise UserInputError(f"{where}: label {value!r} is a number in digits other than 0-9; write the id in "
                             f"0-9, or use a name")
    return value


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
            if index > MAX_LABEL_ID:  # the label map has an entry per id up to the largest
                raise UserInputError(f"{source}: row {row_no}: label id {value!r} is past {MAX_LABEL_ID:,}; label "
                                     f"ids count classes from 0 (use names for sparse codes)")
            ids[index] = str(row.get("label_name", ids.get(index, index)))
            first_id_row = first_id_row or (row_no, value)
        else:
            names.add(check_label_name(str(value), f"{source}: row {row_no}"))
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
        elif task.type == "seq2seq":  # an encoder-decoder reads the input and writes the target
            if "prompt" not in row and "completion" not in row:
                raise UserInputError(f"{source}: {where}: seq2seq rows need 'prompt' (the input) and 'completion' (the "
                                     f"target); fields found: {sorted(row)}")
            examples.append(Example(row_no, prompt=text_of(row, "prompt", where, source),
                                    completion=text_of(row, "completion", where, source)))
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
