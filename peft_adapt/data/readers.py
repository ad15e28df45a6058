"""Data files read with row numbers: JSONL, CSV, Parquet and `datasets` folders, UTF-8 checked."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from ..errors import UserInputError


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


def text_of(row: dict, key: str, where: str, source: Path) -> str:
    if key not in row:
        raise UserInputError(f"{source}: {where}: missing field {key!r} (fields found: {sorted(row)})")
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise UserInputError(f"{source}: {where}: field {key!r} must be a non-empty string, found {value!r}")
    return value
