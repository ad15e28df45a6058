"""The adapter-reference grammar: every spelling a user may write for an adapter, parsed in one place into one typed
value, and one `resolve()` from it to what the registry holds. Every other module takes the parsed value.

    base | none | ""           the base model alone                      Base()
    NAME                        the latest version of a registered name   Named("books")
    NAME@3                      a version (ASCII digits, no leading zero) Named("books", version=3)
    NAME@TAG                    a tag (`latest` is the latest version)    Named("books", tag="prod")
    ./DIR, a/b, ~/DIR, /DIR     an adapter folder (only where allowed)    Folder("./books")
    DOMAIN+TASK                 a stack, bottom first (2-4 parts)         Stack((Named(...), Named(...)))
    auto | auto:TAG | auto:a,b  routed per input among signed adapters    Auto(), Auto(tag=...), Auto(names=(...))
    ~mix:a=0.6,b=0.4            a routed mix (the runtime names these)    Mix((("a", 0.6), ("b", 0.4)))

`str(ref)` is the canonical spelling (`auto:b,a` is `auto:a,b`, `books@latest` is `books`), so a cache or a resident
slot keyed on it holds one entry per meaning, whatever spelling a request used.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ..errors import UserInputError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
BASE_SPELLINGS = ("", "base", "none")  # a row or request naming one of these runs the base model alone
STACK_SEPARATOR = "+"  # `books-domain+sentiment`: registry names cannot hold a '+'
MAX_PARTS = 4  # each part adds its rank to the stack's slot: a request naming hundreds must not size the stacks
AUTO = "auto"
MAX_NAMED = 64  # adapters a named router lists
MAX_VERSION = 2**31 - 1  # a version past this is no version any registry holds (and overflows an index column)
MIX_PREFIX = "~mix:"  # never a registry name (no '~')
RESERVED = {"base": "the base model", "none": "the base model", AUTO: "the router"}


def check_name(value: str, what: str = "name") -> str:
    """Names become folder names: letters, digits, '_', '.', '-', no '..', no control characters."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or ".." in value:
        raise UserInputError(
            f"adapter {what} {value!r} is not allowed: use 1-128 letters, digits, '_', '.' or '-', starting with "
            f"a letter or digit, without '/', '..' or control characters"
        )
    if what == "name" and value in RESERVED:
        raise UserInputError(f"adapter name {value!r} is reserved: it names {RESERVED[value]}; choose another name")
    return value


def is_folder_ref(ref: str) -> bool:
    """A reference written as a path (`runs/x/books`, `./books`, `~/a`): adapter names cannot contain a `/` or
    start with `.` or `~`, so a name and a path never read alike. Only such references mean folders."""
    return "/" in ref or os.sep in ref or ref.startswith((".", "~"))


@dataclass(frozen=True)
class Base:
    def __str__(self) -> str:
        return "base"


@dataclass(frozen=True)
class Named:
    """A registered adapter: its latest version, a version or a tag."""

    name: str
    version: int | None = None
    tag: str | None = None

    def __str__(self) -> str:
        selector = self.version if self.version is not None else self.tag
        return self.name if selector is None else f"{self.name}@{selector}"


@dataclass(frozen=True)
class Folder:
    path: str

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class Stack:
    """Adapters whose deltas add, bottom (domain) first, top (task) last."""

    parts: tuple[Named | Folder, ...]

    def __str__(self) -> str:
        return STACK_SEPARATOR.join(map(str, self.parts))


@dataclass(frozen=True)
class Auto:
    """A router: every signed adapter of the base and task, those of a tag, or those named."""

    tag: str | None = None
    names: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.names:
            return f"{AUTO}:" + ",".join(self.names)
        return f"{AUTO}:{self.tag}" if self.tag else AUTO


@dataclass(frozen=True)
class Mix:
    """A linear mix of adapters, as a router's route names it: parts sorted, weights to two decimals."""

    weights: tuple[tuple[str, float], ...]

    def __str__(self) -> str:
        return MIX_PREFIX + ",".join(f"{name}={w:.2f}" for name, w in self.weights)

    def as_dict(self) -> dict[str, float]:
        return dict(self.weights)


AdapterRef = Union[Base, Named, Folder, Stack, Auto, Mix]


def parse_ref(text, *, folders: bool = True) -> AdapterRef:
    """The one parser. `folders=False` where a path must never be read (an HTTP request's `model`)."""
    if text is None or isinstance(text, Base):
        return Base()
    if isinstance(text, (Named, Folder, Stack, Auto, Mix)):
        return text
    if not isinstance(text, str):
        raise UserInputError(f"an adapter reference is a string, not {type(text).__name__}")
    if text in BASE_SPELLINGS:
        return Base()
    if text.startswith(MIX_PREFIX):
        return _parse_mix(text)
    if text == AUTO or text.startswith(AUTO + ":"):
        return _parse_auto(text)
    if is_folder_ref(text):
        return _parse_folder(text, folders)
    if STACK_SEPARATOR in text:
        return _parse_stack(text, folders)
    return _parse_named(text)


def _parse_named(text: str) -> Named:
    name, at, selector = text.partition("@")
    check_name(name)
    if not at or selector == "latest":
        return Named(name)
    if selector.isdigit():
        if not selector.isascii() or (selector.startswith("0") and selector != "0"):
            raise UserInputError(f"{text[:200]!r}: a version is written in ASCII digits without leading zeros, "
                                 f"e.g. {name}@3")
        if len(selector) > 10 or int(selector) > MAX_VERSION:
            raise UserInputError(f"{text[:200]!r}: no registry holds a version past {MAX_VERSION}")
        return Named(name, version=int(selector))
    return Named(name, tag=check_name(selector, "tag"))


def _parse_folder(text: str, folders: bool) -> Folder:
    if not folders:
        raise UserInputError(f"{text[:200]!r} is a path; here only registered adapter names are accepted")
    return Folder(text)


def _parse_stack(text: str, folders: bool) -> Stack:
    parts = text.split(STACK_SEPARATOR)
    if any(not p.strip() for p in parts):
        raise UserInputError(f"{text[:200]!r}: a stack names its adapters joined by '+', bottom first, e.g. "
                             f"books-domain+sentiment")
    if len(parts) > MAX_PARTS:
        raise UserInputError(f"{text[:200]!r}: a stack names at most {MAX_PARTS} different adapters, each once")
    parsed = tuple(_parse_folder(p, folders) if is_folder_ref(p) else _parse_named(p) for p in parts)
    if len(set(parsed)) != len(parsed):
        raise UserInputError(f"{text[:200]!r}: a stack names at most {MAX_PARTS} different adapters, each once")
    return Stack(parsed)


def _parse_auto(text: str) -> Auto:
    rest = text[len(AUTO) + 1:] if text != AUTO else ""
    if "," not in rest:
        return Auto(tag=check_name(rest, "tag") if rest else None)
    parts = [part.strip() for part in rest.split(",") if part.strip()]
    if len(parts) > MAX_NAMED:
        raise UserInputError(f"a router names at most {MAX_NAMED} adapters; use a tag (auto:TAG) for more")
    return Auto(names=tuple(sorted({str(_parse_named(part)) for part in parts})))


def _parse_mix(text: str) -> Mix:
    weights = {}
    for part in text[len(MIX_PREFIX):].split(","):
        ref, _, value = part.partition("=")
        try:
            weights[str(_parse_named(ref.strip()))] = round(float(value), 2)
        except ValueError:
            raise UserInputError(f"{text[:200]!r} is not a routed mix (name=weight,...)") from None
    return Mix(tuple(sorted(weights.items())))


def mix_of(weights: dict[str, float]) -> Mix:
    """The routed mix of these weights (its name says its parts, so an evicted mix can be loaded again)."""
    return _parse_mix(MIX_PREFIX + ",".join(f"{name}={w:.2f}" for name, w in weights.items()))


@dataclass(frozen=True)
class Located:
    """Where a Named or Folder reference points: the folder, how to show it, and the registry version if any."""

    folder: Path
    source: str
    version: int | None


def resolve(ref: Named | Folder, registry) -> Located:
    """The one step from a parsed single-adapter reference to its folder; a registry reference reads the index once."""
    if isinstance(ref, Folder):
        folder = Path(ref.path).expanduser()
        if not folder.is_dir():
            raise UserInputError(f"{ref.path}: no such adapter folder")
        return Located(folder, ref.path, None)
    if not isinstance(ref, Named):
        raise UserInputError(f"{ref} names {type(ref).__name__.lower()} of adapters, not one adapter")
    try:
        entry = registry.get(ref)
    except UserInputError as exc:
        if Path(ref.name).is_dir():
            raise UserInputError(f"{exc}. A folder {ref.name!r} exists here: write ./{ref.name} to use the folder") from None
        raise
    return Located(entry.path, entry.ref, entry.version)
