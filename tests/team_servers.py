"""Real servers for the shared registry's tests: PostgreSQL (pgserver: the server binaries in a wheel, no root) and
an S3-compatible server (moto in server mode), each in its own process on this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "peft-adapt-tests"


def start_postgres(data_dir: Path):
    """A PostgreSQL server on a Unix socket in `data_dir`; stopped with the returned handle's cleanup()."""
    import pgserver

    return pgserver.get_server(data_dir, cleanup_mode="stop")


def start_s3() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free loopback port; (process, endpoint URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.1)


@dataclass
class Backend:
    """One registry, embedded or shared, as the tests open it: in this process, in the CLI, in subprocesses."""

    kind: str
    location: str
    store: str | None = None
    cache: str | None = None
    env_extra: dict = field(default_factory=dict)

    def open(self, cache: str | None = None):
        from peft_adapt.registry import Registry

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


def new_database(server) -> str:
    """A fresh, empty database on the server; its URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base, _, query = server.get_uri().partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}?{query}"
