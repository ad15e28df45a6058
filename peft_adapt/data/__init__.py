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

from .collate import IGNORE_INDEX, Collator, MaskingCollator, mask_tokens, pad_batch
from .examples import (
    CHAT_ROLES,
    DomainExamples,
    Example,
    LabelMap,
    TaskSpec,
    build_label_map,
    build_tag_map,
    chat_messages,
    few_shot,
    label_value,
    parse_examples,
    read_domain,
    read_eval_file,
    split_off_eval,
)
from .readers import DATA_SUFFIXES, file_sha256, iter_texts, read_rows, read_texts, read_utf8, text_of
from .tokenize import (
    DomainData,
    render_chat,
    tokenize,
    tokenize_causal_lm,
    tokenize_chat,
    tokenize_classification,
    tokenize_domain,
    tokenize_masked_lm,
    tokenize_token_classification,
)

__all__ = [
    "IGNORE_INDEX", "Collator", "MaskingCollator", "mask_tokens", "pad_batch", "CHAT_ROLES", "DomainExamples",
    "Example", "LabelMap", "TaskSpec", "build_label_map", "build_tag_map", "chat_messages", "few_shot",
    "label_value", "parse_examples", "read_domain", "read_eval_file", "split_off_eval", "DATA_SUFFIXES",
    "file_sha256", "iter_texts", "read_rows", "read_texts", "read_utf8", "text_of", "DomainData", "render_chat", "tokenize",
    "tokenize_causal_lm", "tokenize_chat", "tokenize_classification", "tokenize_domain", "tokenize_masked_lm",
    "tokenize_token_classification",
]
