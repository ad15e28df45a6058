"""Which adapters are resident, in which slot, and which one leaves when room is needed (LRU, pins kept)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from ..errors import UserInputError

# the adapters' tasks a runtime serves: a classification runtime holds the bare encoder, under any head
SERVED_TASKS = {"causal_lm": ("causal_lm",), "classification": ("classification", "token_classification"),
                "seq2seq": ("seq2seq",)}


class NoRoom(UserInputError):
    """Every resident adapter that could make room is pinned or in use."""


@dataclass
class ResidentAdapter:
    name: str
    slot: int
    method: str
    extent: int  # how far its method's stacks reach for it (LoRA rank, bottleneck size)
    nbytes: int  # the adapter's own parameter bytes
    source: str  # where it came from: a registry ref or a folder
    group_model: object = None  # a method that is not stacked: the model its rows run through
    pinned: bool = False
    head: dict = field(default_factory=dict)  # classification head (weight, bias), if any
    labels: list[str] | None = None
    pooling: str | None = None
    max_length: int | None = None  # the training max_length: classification inputs are cut to it
    task: str | None = None  # the adapter's own task (a classification runtime serves token classifiers too)
    recipe: dict | None = None  # for a load-time combination: {ref: weight}
    version: int | None = None  # the registry version it was read from (None: a folder, a mix, memory)


class Residency:
    """Slots 1..N for adapters (slot 0 is "no adapter"), least-recently-used order, limits, counters."""

    def __init__(self, max_adapters: int | None = None, max_bytes: int | None = None):
        if max_adapters is not None and max_adapters < 1:
            raise UserInputError(f"max_adapters must be at least 1, got {max_adapters}")
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.adapters: OrderedDict[str, ResidentAdapter] = OrderedDict()  # oldest use first
        self._free: list[int] = []
        self._next_slot = 1
        self.hits = self.misses = self.evictions = 0
        self.load_seconds = 0.0

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def use(self, name: str) -> ResidentAdapter:
        """A resident adapter, marked most recently used."""
        self.adapters.move_to_end(name)
        return self.adapters[name]

    @property
    def resident_bytes(self) -> int:
        return sum(a.nbytes for a in self.adapters.copy().values())

    def victims_for(self, nbytes: int, keep: set[str] = frozenset()) -> list[str]:
        """Least-recently-used unpinned adapters to evict so one more of `nbytes` fits."""
        victims: list[str] = []
        count, total = len(self.adapters), self.resident_bytes
        candidates = [n for n, a in self.adapters.items() if not a.pinned and n not in keep]
        while (self.max_adapters is not None and count + 1 > self.max_adapters) or (
            self.max_bytes is not None and total + nbytes > self.max_bytes
        ):
            if not candidates:
                limit = f"max_adapters={self.max_adapters}" if self.max_adapters else f"max_bytes={self.max_bytes}"
                raise NoRoom(
                    f"no room for another adapter ({limit}, {count} resident, all pinned or in use by this call); "
                    f"unpin or unload one, or raise the limit"
                )
            victim = candidates.pop(0)
            victims.append(victim)
            count -= 1
            total -= self.adapters[victim].nbytes
        return victims

    def allocate_slot(self) -> int:
        if self._free:
            return self._free.pop(0)
        self._next_slot += 1
        return self._next_slot - 1

    def add(self, adapter: ResidentAdapter) -> None:
        self.adapters[adapter.name] = adapter

    def remove(self, name: str) -> ResidentAdapter:
        adapter = self.adapters.pop(name)
        self._free.append(adapter.slot)
        self._free.sort()
        return adapter
