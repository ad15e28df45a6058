"""The server under a load generator nobody here wrote: locust, headless, on loopback.

Starts `peft-adapt serve` twice (continuous batching, `--scheduler step`, and whole requests, `--scheduler request`),
both up at once, and runs `locust -f benchmarks/locustfile.py --headless` against each in turn for --seconds: --users
users each sending completions one after another to one of 4 adapters, a quarter of them --long-tokens long and the
rest 16, each with its own seed. Prints one JSON line per server (requests, failures, p50/p99 per kind, generated
tokens/s) and the ratio line. Needs `pip install locust`.

    python benchmarks/serve_locust.py [--model smollm2-135m] [--quantization none] [--users 16] [--seconds 240]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from serve_load import KEY, _start, registry_with_adapters

HERE = Path(__file__).resolve().parent


def _locust(url: str, names: list[str], users: int, seconds: int, long_tokens: int, out: Path) -> dict:
    env = os.environ | {"LOCUST_ADAPTERS": ",".join(names), "LOCUST_KEY": KEY, "LOCUST_LONG_TOKENS": str(long_tokens),
                        "LOCUST_SHORT_TOKENS": "16"}
    subprocess.run([sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "-u", str(users),
                    "-r", str(users), "-t", f"{seconds}s", "--host", url, "--csv", str(out), "--only-summary",
                    "--stop-timeout", "0"], env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = {row["Name"]: row for row in csv.DictReader(open(f"{out}_stats.csv"))}
    result = {"seconds": seconds}
    tokens = 0
    for kind, length in (("short", 16), ("long", long_tokens)):
        row = rows.get(kind)
        if row is None:
            continue
        done = int(row["Request Count"]) - int(row["Failure Count"])
        tokens += done * length
        result |= {f"{kind}_requests": done, f"{kind}_failures": int(row["Failure Count"]),
                   f"{kind}_p50_s": float(row["50%"]) / 1000, f"{kind}_p99_s": float(row["99%"]) / 1000}
    result["tokens_per_s"] = tokens / seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=240)
    parser.add_argument("--long-tokens", type=int, default=400)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_locust_"))
    try:
        registry, names = registry_with_adapters(work, args.model, 4)
        common = ["--max-batch", "32", "--max-tokens", str(max(512, args.long_tokens)), "--adapters", ",".join(names)]
        servers = {label: _start(args.model, args.quantization, registry.root, common + ["--scheduler", label])
                   for label in ("step", "request")}
        results = {}
        try:
            for label, (_, url) in servers.items():
                results[label] = _locust(url, names, args.users, args.seconds, args.long_tokens, work / label)
                print(json.dumps({"name": "serve_locust", "scheduler": label, "model": args.model,
                                  "quantization": args.quantization, "users": args.users, **results[label],
                                  "device": f"cpu ({os.cpu_count()} cores)"}), flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
        step, request = results["step"], results["request"]
        print(json.dumps({"name": "serve_locust_step_over_request", "value": step["tokens_per_s"],
                          "baseline": request["tokens_per_s"], "ratio": step["tokens_per_s"] / request["tokens_per_s"],
                          "short_p99_ratio": step.get("short_p99_s", 0) / max(request.get("short_p99_s", 0), 1e-9),
                          "note": "completed requests only: a request still running when time is up is not counted"}),
              flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
