"""Data files read with row numbers: JSONL, CSV, Parquet and `datasets` folders, UTF-8 checked."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from ..errors import UserInputError

MAX_CSV_FIELD = 16 << 20  # bytes in one CSV field
MAX_LINE_BYTES = 16 << 20  # bytes in one line of a text or JSONL file read for inference


def read_utf8(path: Path) -> str:
    """A text file's content; a byte that is not UTF-8 is named with its line, instead of a traceback."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserInputError(f"{path}: line {line}: byte {raw[exc.start]:#x} is not UTF-8; save the file as UTF-8") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    # lines end at "\n" only: a stray "\r" or U+2028 inside a line must not split a record
    return [(line_no, _json_row(line, line_no, path))
            for line_no, line in enumerate(read_utf8(path).split("\n"), start=1) if line.strip()]


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    import io

    csv.field_size_limit(MAX_CSV_FIELD)  # the module's own limit (128 KiB) stopped a long document with a traceback
    reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""))
    rows = []
    try:
        # row numbers count data rows; the header is row 0
        for i, row in enumerate(reader, start=1):
            if None in row:  # DictReader keeps what a row has beyond the header under the key None
                raise UserInputError(f"{path}: row {i}: {len(reader.fieldnames or []) + len(row[None])} fields, the "
                                     f"header names {len(reader.fieldnames or [])}; quote fields that hold commas")
            rows.append((i, dict(row)))
    except csv.Error as exc:
        raise UserInputError(f"{path}: row {reader.line_num}: not CSV this reader takes ({exc}); fields hold at "
                             f"most {MAX_CSV_FIELD // (1 << 20)} MiB, quoted with \"") from None
    return rows


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
    return list(iter_texts(path, text_field))


def iter_texts(path: str | Path, text_field: str = "text", max_line_bytes: int = MAX_LINE_BYTES, words: bool = False):
    """`read_texts` one item at a time, reading the file as it goes: a file of any length costs a line's memory,
    and a line past `max_line_bytes` is refused once that much of it is read (JSONL and plain text; CSV fields
    are bounded by MAX_CSV_FIELD, Parquet is read a batch of rows at a time). With `words`, a field may also hold a
    list of words (CoNLL's `tokens`)."""
    path = Path(path)
    if path.is_dir() or path.suffix in (".csv", ".parquet", ".pq"):
        rows = _iter_parquet(path) if path.suffix in (".parquet", ".pq") else read_rows(path, "test")
        yield from ((_id_of(row, n), text_of(row, text_field, f"row {n}", path, words)) for n, row in rows)
        return
    if not path.is_file():
        raise UserInputError(f"input file {path} does not exist")
    jsonl, found = path.suffix in DATA_SUFFIXES, False
    for n, line in _lines(path, max_line_bytes):
        if jsonl:
            if not line.strip():
                continue
            row = _json_row(line, n, path)
            found = True
            yield _id_of(row, n), text_of(row, text_field, f"row {n}", path, words)
        elif line.strip():
            found = True
            yield n, line[:-1] if line.endswith("\r") else line
    if not found:
        raise UserInputError(f"{path}: {'the dataset is empty (no rows)' if jsonl else 'no text in the file (every line is blank)'}")


def _id_of(row: dict, n: int):
    return row.get("id", n) if isinstance(row.get("id"), (int, str)) else n


def _json_row(line: str, line_no: int, path: Path) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: line {line_no}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise UserInputError(f"{path}: line {line_no}: expected a JSON object, found {type(row).__name__}")
    return row


def _lines(path: Path, max_line_bytes: int):
    """(line number, line) split on b"\\n" only, each decoded as UTF-8; a line longer than `max_line_bytes` is
    refused without reading the rest of it."""
    with open(path, "rb") as f:
        for n, raw in enumerate(iter(lambda: f.readline(max_line_bytes + 1), b""), start=1):
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise UserInputError(f"{path}: line {n} is longer than {max_line_bytes // (1 << 20)} MiB; split it "
                                     f"(one text per line)")
            try:
                yield n, raw.rstrip(b"\n").decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserInputError(f"{path}: line {n}: byte {raw[exc.start]:#x} is not UTF-8; save the file as "
                                     f"UTF-8") from None


def _iter_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield n, row
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{path}: not a readable Parquet file ({exc})") from None
    if n == 0:
        raise UserInputError(f"{path}: the dataset is empty (no rows); add examples or point to another file")


def file_sha256(path: str | Path) -> str:
    """Hash of a data file, or of every file in a `datasets` folder, for the manifest."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


def text_of(row: dict, key: str, where: str, source: Path, words: bool = False) -> str | list[str]:
    if key not in row:
        raise UserInputError(f"{source}: {where}: missing field {key!r} (fields found: {sorted(row)})")
    value = row[key]
    if words and isinstance(value, list) and value and all(isinstance(w, str) and w.strip() for w in value):
        return value
    if not isinstance(value, str) or not value.strip():
        raise UserInputError(f"{source}: {where}: field {key!r} must be a non-empty string, found {value!r}")
    return value
