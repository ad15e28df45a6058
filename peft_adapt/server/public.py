"""What a remote client may read of an error: its public message, with every place the server keeps things (the
registry's location, store and cache, the base's folder) replaced by a word."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserInputError


def private_locations(registry, runtime) -> dict[str, str]:
    """Where the server keeps things, each with the word a client reads instead: a message that names one (an
    adapter that does not fit, a file missing from the store) reaches the client without it."""
    found = {}
    objects = getattr(registry, "objects", None)
    for value, word in ((getattr(registry, "where", None), "the registry"), (getattr(registry, "root", None),
                        "the registry"), (getattr(objects, "url", None), "the registry's store"),
                        (getattr(objects, "cache", None), "the registry's cache"),
                        (getattr(objects, "prefix", None), "the registry's store"),
                        (getattr(getattr(registry, "index", None), "url", None), "the registry"),
                        (getattr(runtime.backbone, "path", None), "the base")):
        if value:
            found[str(value)] = word
            if isinstance(value, Path):
                found[str(value.resolve())] = word
    return dict(sorted(found.items(), key=lambda kv: len(kv[0]), reverse=True))  # longest first


def without_locations(message: str, private: dict[str, str]) -> str:
    for value, word in private.items():
        message = message.replace(value, word)
    return message


def public_message(exc: UserInputError, private: dict[str, str]) -> str:
    return without_locations(exc.public, private)


def public_base_name(base: str) -> str:
    """The name a base is served under: a folder's own name (where it lies on the server is no client's business),
    an alias or hub id as given."""
    path = Path(base).expanduser()
    return path.resolve().name if path.exists() else base
