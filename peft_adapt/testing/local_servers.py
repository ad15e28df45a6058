"""Real servers for the shared registry's tests and benchmarks, on this machine: PostgreSQL (pgserver: the server
binaries in a wheel, no root needed) and an S3-compatible server (moto in server mode, its own process).
Both come with the dev extra; nothing here is used by the library itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "peft-adapt-tests"


def start_postgres(data_dir: Path):
    """A PostgreSQL server on a Unix socket in `data_dir`; stopped with the returned handle's cleanup()."""
    import pgserver

    Path(data_dir).parent.mkdir(parents=True, exist_ok=True)
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


def new_database(server) -> str:
    """A fresh, empty database on the server; its URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base, _, query = server.get_uri().partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}?{query}"


@contextmanager
def local_team_servers(work: Path):
    """Both servers started for a test session or a benchmark: yields (PostgreSQL server, the S3 environment).
    The S3 variables are set in this process (s3fs reads them, as the AWS tools do) and restored after."""
    postgres = start_postgres(Path(work) / "pg")
    proc, endpoint = start_s3()
    env = S3_ENV | {"AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        s3fs.S3FileSystem().mkdir(BUCKET)
        yield postgres, env
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        postgres.cleanup()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
