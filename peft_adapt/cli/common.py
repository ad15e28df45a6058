"""What every verb shares: the registry options, threads, tables, inputs and prediction files."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserInputError
from ..registry.store import Registry


def add_registry_arguments(parser, default=None) -> None:
    parser.add_argument("--registry", default=default,
                        help="a registry folder (default: $PEFT_ADAPT_REGISTRY, $PEFT_ADAPT_HOME or ~/.peft_adapt), a "
                             "postgresql:// URL (a team's shared registry, with --store) or a registry config YAML")
    parser.add_argument("--store", default=default, help="with a postgresql:// registry: where its files live "
                                                         "(s3://bucket/prefix; default: $PEFT_ADAPT_STORE)")


def open_registry(args) -> Registry:
    return Registry(getattr(args, "registry", None), store=getattr(args, "store", None))


def threads_arg(value: str):
    if value == "auto" or (value.isdigit() and int(value) >= 1):
        return value if value == "auto" else int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: give a number of threads (1 or more) or auto")


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def headline(metrics: dict) -> str:
    split = metrics.get("test") or metrics.get("eval") or {}
    for key in ("accuracy", "perplexity", "macro_f1", "loss"):
        if key in split:
            return f"{key}={split[key]:.4g}"
    return ""


def read_inputs(args, unescape: bool = False) -> list[tuple[int | str, str]]:
    """(id, text) pairs from the arguments (ids 1..N) and from --file: a data file's `--text-field` (ids: its `id`
    field or row numbers), or a text file with one text per line (ids: line numbers)."""
    return list(iter_inputs(args, unescape))


def iter_inputs(args, unescape: bool = False, words: bool = False):
    """`read_inputs` one at a time, the file read as it is consumed (a file of any size costs a chunk's memory)."""
    from ..data import iter_texts  # lazy: the CLI starts without torch

    yield from enumerate(args.prompts, start=1)
    if args.file:
        for item_id, text in iter_texts(args.file, args.text_field, words=words):
            yield item_id, text.replace("\\n", "\n") if unescape else text  # prompt files write a newline as \\n
    elif not args.prompts:
        raise UserInputError("no inputs: give texts as arguments or with --file")


def chunks(items, size: int):
    """Lists of up to `size` items, taken from an iterator as they are needed."""
    import itertools

    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def one_line(text: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def predictions_file(args):
    """--out: predictions as JSONL, one per input with its id; otherwise nothing (they are printed)."""
    from contextlib import nullcontext

    if not getattr(args, "out", None):
        return nullcontext(None)
    path = Path(args.out)
    if path.is_dir():
        raise UserInputError(f"--out {path} is a folder; name a file such as predictions.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w", encoding="utf-8")
