"""Server under load: N concurrent clients x M requests over K adapters, batched against one at a time, and the
batch-invariant mode against the default batched one.

Starts `peft-adapt serve` twice on 127.0.0.1, both on the same base, registry and load: once as
shipped (requests batched across adapters) and once with `--max-batch 1` (one request at a time, an
adapter switch per request: the baseline). Prints one JSON line per server with requests/s, generated
tokens/s, p50/p99 latency and failures, then the ratio line.

    python benchmarks/serve_load.py [--model smollm2-135m] [--clients 16] [--requests 4] [--adapters 4]

With --ray: `serve --ray` with 2 replicas against 1 (both on a local Ray cluster the command starts, adapters not
preloaded: Ray's multiplexing places them), tokens/s ratio, and the share of requests answered by a replica that
had already served their adapter (the header x-peft-adapt-replica names it), of all requests (each adapter's first
request cannot be: at most 1 - adapters/requests) and of the requests after each adapter's first. On one machine's
CPU cores the two replicas share the cores: the ratio measures Ray's overhead, not the speed-up replicas on
separate machines give.

    python benchmarks/serve_load.py --ray --adapters 8 [--clients 16] [--requests 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
KEY = "bench-key"
PROMPTS = ["Question: What is a Python decorator?\nAnswer:", "The stock market today", "def merge_sorted(a, b):",
           "Symptoms of the common cold include", "In the court's judgment,", "import json\n\ndef load(path):"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model: str, quantization: str, registry: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "peft_adapt.cli", "serve", "--base", model, "--quantization",
                             quantization, "--registry", str(registry), "--port", str(port), "--api-key", KEY, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}): {' '.join(proc.args)}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start")


async def _load(url: str, clients: int, requests: int, adapters: list[str], max_tokens: int, seed: int) -> dict:
    import httpx

    latencies, failures, tokens, served = [], 0, 0, []
    rng = random.Random(seed)
    plan = [[(rng.choice(adapters), rng.choice(PROMPTS)) for _ in range(requests)] for _ in range(clients)]

    async def client(jobs):
        nonlocal failures, tokens
        async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {KEY}"}) as http:
            for adapter, prompt in jobs:
                started = time.perf_counter()
                r = await http.post(f"{url}/v1/completions", json={"model": adapter, "prompt": prompt,
                                                                    "max_tokens": max_tokens, "temperature": 0})
                latencies.append(time.perf_counter() - started)
                served.append((adapter, r.headers.get("x-peft-adapt-replica")))
                if r.status_code != 200:
                    failures += 1
                else:
                    tokens += r.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    await asyncio.gather(*(client(jobs) for jobs in plan))
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    seen, hits, first = set(), 0, set()
    for adapter, replica in served:  # in the order the answers came back
        hits += (adapter, replica) in seen
        seen.add((adapter, replica))
        first.add(adapter)
    # every adapter's first request must load it somewhere: with A adapters and N requests, hits <= N - A
    later = len(served) - len(first)
    return {"held_adapter_share": hits / len(served), "held_after_first_share": hits / later if later else None,
            "replicas_used": len({r for _, r in served}),
            "requests_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall,
            "p50_latency_s": statistics.median(ordered), "p99_latency_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "failed_requests": failures, "requests": len(latencies), "wall_s": wall}


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_adapt import Registry
    from peft_adapt.models.backbone import resolve_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--ray", action="store_true", help="serve --ray: 2 replicas against 1")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        registry = Registry(work / "registry")
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model))
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                            task_type="CAUSAL_LM")
        model = get_peft_model(base, config, adapter_name="a0")
        for i in range(args.adapters):
            if i:
                model.add_adapter(f"a{i}", config)
            model.save_pretrained(work / "adapters", selected_adapters=[f"a{i}"])
            registry.import_peft(work / "adapters" / f"a{i}", base=args.model, name=f"adapter{i}")
        del model, base
        names = [f"adapter{i}" for i in range(args.adapters)]
        results = {}
        servers = (("batched", ["--max-batch", "64", "--batch-window-ms", "10"]),
                   ("batched_invariant", ["--max-batch", "64", "--batch-window-ms", "10", "--batch-invariant"]),
                   ("one_at_a_time", ["--max-batch", "1", "--batch-window-ms", "0"]))
        if args.ray:
            servers = tuple((f"ray_{n}_replicas", ["--ray", "--replicas", str(n), "--max-batch", "64",
                                                  "--batch-window-ms", "10"]) for n in (2, 1))
        for label, extra in servers:
            preload = [] if args.ray else ["--adapters", ",".join(names)]
            proc, url = _start(args.model, args.quantization, registry.root, extra + preload)
            try:
                results[label] = asyncio.run(_load(url, args.clients, args.requests, names, args.max_tokens, seed=0))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            print(json.dumps({"name": "serve_load", "server": label, "model": args.model, "quantization": args.quantization,
                              "clients": args.clients, "requests_per_client": args.requests, "adapters": args.adapters,
                              "max_tokens": args.max_tokens, **results[label], "device": device}), flush=True)
        if args.ray:
            two, one = results["ray_2_replicas"], results["ray_1_replicas"]
            print(json.dumps({"name": "ray_two_against_one_replica", "value": two["tokens_per_s"],
                              "baseline": one["tokens_per_s"], "ratio": two["tokens_per_s"] / one["tokens_per_s"],
                              "held_adapter_share": two["held_adapter_share"],
                              "held_after_first_share": two["held_after_first_share"],
                              "replicas_used": two["replicas_used"],
                              "note": "both on this machine's cores: overhead, not speed-up", "device": device}),
                  flush=True)
            return
        ours, base_line = results["batched"], results["one_at_a_time"]
        print(json.dumps({"name": "serve_load_throughput_ratio", "value": ours["requests_per_s"],
                          "baseline": base_line["requests_per_s"], "ratio": ours["requests_per_s"] / base_line["requests_per_s"],
                          "p50_latency_ratio": ours["p50_latency_s"] / base_line["p50_latency_s"],
                          "baseline_is": "the same server with --max-batch 1 (an adapter switch per request)",
                          "device": device}), flush=True)
        invariant = results["batched_invariant"]
        print(json.dumps({"name": "batch_invariant_throughput_ratio", "value": invariant["requests_per_s"],
                          "baseline": ours["requests_per_s"], "ratio": invariant["requests_per_s"] / ours["requests_per_s"],
                          "tokens_per_s_ratio": invariant["tokens_per_s"] / ours["tokens_per_s"],
                          "baseline_is": "the same batched server in its default mode", "device": device}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
