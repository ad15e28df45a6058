"""How the tests open a registry on either backend (the servers themselves: peft_adapt/local_servers.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class Backend:
    """One registry, embedded or shared, as the tests open it: in this process, in the CLI, in subprocesses."""

    kind: str
    location: str
    store: str | None = None
    cache: str | None = None
    env_extra: dict = field(default_factory=dict)

    def open(self, cache: str | None = None):
        from peft_adapt import Registry

        return Registry(self.location, store=self.store, cache=cache or self.cache)

    @property
    def cli(self) -> list[str]:
        return ["--registry", self.location] + (["--store", self.store] if self.store else [])

    @property
    def env(self) -> dict:
        """The environment a subprocess opens this registry from, with `Registry()`."""
        env = dict(os.environ) | self.env_extra | {"PEFT_ADAPT_REGISTRY": self.location}
        if self.store:
            env |= {"PEFT_ADAPT_STORE": self.store, "PEFT_ADAPT_CACHE": self.cache}
        return env
