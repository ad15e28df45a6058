"""Examples to token ids, one function per task; chat rendered by the tokenizer's own template."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserInputError
from .collate import IGNORE_INDEX, mask_tokens
from .examples import DomainExamples, Example, LabelMap, TaskSpec


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


def tokenize_seq2seq(examples: list[Example], tokenizer, max_length: int) -> list[dict]:
    """The input's ids (cut to max_length) for the encoder; the target's ids, ending in EOS, as the decoder's
    labels (cut to max_length too)."""
    eos = tokenizer.eos_token_id
    features = []
    for ex in examples:
        enc = tokenizer(ex.prompt, truncation=True, max_length=max_length)
        target = tokenizer(ex.completion, add_special_tokens=True)["input_ids"]
        if eos is not None and (not target or target[-1] != eos):
            target = target + [eos]  # a T5 tokenizer adds it; a BPE one may not
        features.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                         "labels": target[:max_length], "row": ex.row})
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


def encode_words(tokenizer, rows: list[list[str]], limits: list[int]) -> tuple:
    """(ids, mask, starts) padded on the right: `starts` is True at each word's first sub-token. A row is cut to its
    limit as training cut it; the words past the cut have no start, so they get no tag."""
    import torch

    if not getattr(tokenizer, "is_fast", False):
        raise UserInputError("tagging needs a fast tokenizer (its word ids map tokens to words); this base's is slow")
    encoded = []
    for words, limit in zip(rows, limits):
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=limit)
        previous, starts = None, []
        for word in enc.word_ids():
            starts.append(word is not None and word != previous)
            previous = word
        encoded.append((enc["input_ids"], starts))
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([row + [pad] * (width - len(row)) for row, _ in encoded])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row, _ in encoded])
    starts = torch.tensor([s + [False] * (width - len(s)) for _, s in encoded])
    return ids, mask, starts


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


def tokenize(examples: list[Example], tokenizer, task: TaskSpec, seed: int = 0) -> list[dict]:
    if task.type == "masked_lm":
        return tokenize_masked_lm(examples, tokenizer, task.max_length, task.mask_probability, seed)
    if task.type == "causal_lm":
        return tokenize_causal_lm(examples, tokenizer, task.max_length, task.packing)
    if task.type == "token_classification":
        return tokenize_token_classification(examples, tokenizer, task.max_length)
    if task.type == "seq2seq":
        return tokenize_seq2seq(examples, tokenizer, task.max_length)
    return tokenize_classification(examples, tokenizer, task.max_length)


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
