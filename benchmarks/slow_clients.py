"""Slow clients against the server: 3,000 connections that send a header line every few seconds (slowloris), from
many loopback addresses, with the server's connection limits on (the defaults) and off (the baseline: what the
server did before they existed). Prints one JSON line per side:

    held           slow connections still open 2 s after the last one connected
    refused        slow connections the server closed at once (a cap)
    drop_idle_s    seconds from connecting to being closed, for a connection that sends nothing
    client_p50_ms  a new client's GET /health latency (median of 20, another address) while the slow ones are open
    client_errors  of those 20 requests, how many failed (reset, refused, timed out)

    python benchmarks/slow_clients.py [--connections 3000] [--fd-limit 1024]

`--fd-limit` is the server's open-file limit (1,024 is what many systems give a process). Run on an otherwise idle
machine; the server runs the built-in tiny test model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peft_adapt.testing.tiny_models import build_tiny_model  # noqa: E402

OFF = ["--header-timeout", "1e9", "--body-timeout", "1e9", "--max-connections", "1000000",
       "--max-connections-per-peer", "1000000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(base: Path, registry: Path, fd_limit: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = ["prlimit", f"--nofile={fd_limit}:{fd_limit}", sys.executable, "-m", "peft_adapt.cli", "serve",
               "--base", str(base), "--quantization", "none", "--registry", str(registry), "--port", str(port), *extra]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


def is_closed(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def measure(url: str, connections: int) -> dict:
    port = int(url.rsplit(":", 1)[1])
    slow, failed_connects = [], 0
    for i in range(connections):
        sock = socket.socket()
        try:
            sock.bind((f"127.0.{1 + i // 50 // 250}.{2 + (i // 50) % 250}", 0))  # 50 per address
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            slow.append(sock)
        except OSError:
            failed_connects += 1
            sock.close()
    time.sleep(2)
    for sock in slow:  # one more header line each: still "sending"
        try:
            sock.sendall(b"X-slow: 1\r\n")
        except OSError:
            pass
    refused = sum(is_closed(s) for s in slow)
    latencies, errors = [], 0
    client = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.200.1"))
    for _ in range(20):
        started = time.perf_counter()
        try:
            client.get(f"{url}/health", timeout=10).raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
        except httpx.HTTPError:
            errors += 1
    for sock in slow:
        sock.close()
    time.sleep(1)
    idle = socket.create_connection(("127.0.0.1", port))
    started, dropped = time.perf_counter(), None
    while time.perf_counter() - started < 30:
        if is_closed(idle):
            dropped = time.perf_counter() - started
            break
        time.sleep(0.05)
    idle.close()
    return {"held": len(slow) - refused, "refused": refused + failed_connects, "drop_idle_s": dropped,
            "client_p50_ms": statistics.median(latencies) if latencies else None, "client_errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--fd-limit", type=int, default=1024)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.connections + 512)), hard))
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_model(Path(tmp) / "tiny-llama", "llama")
        for side, extra in (("ours", []), ("baseline (no limits)", OFF)):
            proc, url = start(base, Path(tmp) / "reg", args.fd_limit, extra)
            try:
                result = measure(url, args.connections)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            print(json.dumps({"side": side, "connections": args.connections, "fd_limit": args.fd_limit, **result}),
                  flush=True)


if __name__ == "__main__":
    main()
