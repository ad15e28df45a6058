"""Domain adaptation with unlabeled target text: one module per method and one table, as methods/. A new method is a
new module with an `AdaptationMethod` subclass (base.py) and one line here; training asks this table only."""

from __future__ import annotations

from ..errors import UserInputError
from .adda import Adda
from .base import AdaptationMethod
from .coral import Coral
from .dann import Dann
from .entropy import Entropy
from .generate import Generate
from .mmd import Mmd
from .none import NoAlignment

TABLE: dict[str, AdaptationMethod] = {m.name: m for m in (
    Dann(), Coral(), Mmd(), Entropy(), Adda(), Generate(), NoAlignment(),
)}


def adaptation_method(name: str) -> AdaptationMethod:
    if name not in TABLE:
        raise UserInputError(f"domain adaptation method {name!r} is not known; known: {', '.join(TABLE)}")
    return TABLE[name]
