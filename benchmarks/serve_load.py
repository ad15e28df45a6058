"""Server under load: N concurrent clients x M requests over K adapters, batched against one at a time, and the
batch-invariant mode against the default batched one.

Starts `peft-adapt serve` twice on 127.0.0.1, both on the same base, registry and load: once as
shipped (requests batched across adapters) and once with `--max-batch 1` (one request at a time, an
adapter switch per request: the baseline). Prints one JSON line per server with requests/s, generated
tokens/s, p50/p99 latency and failures, then the ratio line.

    python benchmarks/serve_load.py [--model smollm2-135m] [--clients 16] [--requests 4] [--adapters 4]

With --schedulers: continuous batching (`--scheduler step`, the default) against whole-request scheduling
(`--scheduler request`, the scheduler before it), both servers up at once and loaded in turn (interleaved, medians
of --repeats runs), on four workloads: short requests from one client (unloaded), mixed lengths (a quarter of the
requests --long-tokens long, the rest --max-tokens) greedy and seeded (each request its own seed), and the uniform
workload above. Every request asks min_tokens = max_tokens so both servers generate the same lengths. Prints each
run, the medians, and the goal ratios: short-request p50 under load against unloaded, tokens/s seeded and uniform.

    python benchmarks/serve_load.py --schedulers [--clients 16] [--requests 4] [--long-tokens 400] [--repeats 3]

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


async def _complete(http, url: str, body: dict) -> tuple[float, int | None, object]:
    """One completion: its latency, its generated tokens (None if it failed) and the response."""
    started = time.perf_counter()
    r = await http.post(f"{url}/v1/completions", json=body)
    latency = time.perf_counter() - started
    return latency, (r.json()["usage"]["completion_tokens"] if r.status_code == 200 else None), r


async def _mixed(url: str, clients: int, requests: int, adapters: list[str], short: int, long: int, seeded: bool,
                 seed: int) -> dict:
    """Each client sends its requests one after another; a quarter of all requests are long. Latencies per kind."""
    import httpx

    rng = random.Random(seed)
    kinds = ["long" if i % 4 == 0 else "short" for i in range(clients * requests)]
    rng.shuffle(kinds)
    plan = [[(kinds[c * requests + r], rng.choice(adapters), rng.choice(PROMPTS), rng.randrange(1 << 30))
             for r in range(requests)] for c in range(clients)]
    latencies: dict[str, list[float]] = {"short": [], "long": []}
    tokens, failures = 0, 0

    async def client(jobs):
        nonlocal tokens, failures
        async with httpx.AsyncClient(timeout=1800, headers={"Authorization": f"Bearer {KEY}"}) as http:
            for kind, adapter, prompt, request_seed in jobs:
                length = long if kind == "long" else short
                body = {"model": adapter, "prompt": prompt, "max_tokens": length, "min_tokens": length,
                        "temperature": 0.8 if seeded else 0}
                if seeded:
                    body["seed"] = request_seed
                latency, generated, _ = await _complete(http, url, body)
                latencies[kind].append(latency)
                failures += generated is None
                tokens += generated or 0

    started = time.perf_counter()
    await asyncio.gather(*(client(jobs) for jobs in plan))
    wall = time.perf_counter() - started
    result = {"tokens_per_s": tokens / wall, "wall_s": wall, "failed_requests": failures, "tokens": tokens}
    for kind, values in latencies.items():
        if values:
            ordered = sorted(values)
            result[f"{kind}_p50_s"] = statistics.median(ordered)
            result[f"{kind}_p99_s"] = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return result


def _compare_schedulers(args, registry, names: list[str], device: str) -> None:
    """Continuous batching against whole-request scheduling: both servers up, loaded in turn."""
    common = ["--max-batch", "32", "--batch-window-ms", "10", "--max-tokens", str(max(512, args.long_tokens)),
              "--adapters", ",".join(names)]
    servers = {label: _start(args.model, args.quantization, registry.root, common + ["--scheduler", label])
               for label in ("step", "request")}
    workloads = {
        "unloaded": lambda url, rep: _mixed(url, 1, 8, names, args.max_tokens, args.max_tokens, False, rep),
        "mixed": lambda url, rep: _mixed(url, args.clients, args.requests, names, args.max_tokens, args.long_tokens,
                                         False, rep),
        "mixed_seeded": lambda url, rep: _mixed(url, args.clients, args.requests, names, args.max_tokens,
                                                args.long_tokens, True, rep),
        "uniform": lambda url, rep: _mixed(url, args.clients, args.requests, names, args.max_tokens, args.max_tokens,
                                           False, rep),
    }
    runs: dict[tuple[str, str], list[dict]] = {}
    try:
        for rep in range(args.repeats):
            for workload, load in workloads.items():
                for label, (_, url) in servers.items():
                    result = asyncio.run(load(url, rep))
                    runs.setdefault((workload, label), []).append(result)
                    print(json.dumps({"name": "serve_schedulers_run", "workload": workload, "scheduler": label,
                                      "repeat": rep, **result}), flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    medians = {key: {k: statistics.median(r[k] for r in results) for k in results[0] if isinstance(results[0][k], float)}
               for key, results in runs.items()}
    head = {"model": args.model, "quantization": args.quantization, "clients": args.clients,
            "requests_per_client": args.requests, "short_tokens": args.max_tokens, "long_tokens": args.long_tokens,
            "repeats": args.repeats, "threads": os.environ.get("OMP_NUM_THREADS", "default"), "device": device}
    for (workload, label), values in medians.items():
        print(json.dumps({"name": "serve_schedulers_median", "workload": workload, "scheduler": label, **values,
                          **head}), flush=True)
    for label in ("step", "request"):
        print(json.dumps({"name": "short_p50_under_load_over_unloaded", "scheduler": label,
                          "value": medians[("mixed", label)]["short_p50_s"],
                          "baseline": medians[("unloaded", label)]["short_p50_s"],
                          "ratio": medians[("mixed", label)]["short_p50_s"] / medians[("unloaded", label)]["short_p50_s"],
                          "goal": "<= 2 (step)", **head}), flush=True)
    for workload, goal in (("mixed_seeded", ">= 1.5"), ("mixed", None), ("uniform", ">= 0.95")):
        step, request = medians[(workload, "step")], medians[(workload, "request")]
        print(json.dumps({"name": f"{workload}_tokens_per_s_step_over_request", "value": step["tokens_per_s"],
                          "baseline": request["tokens_per_s"], "ratio": step["tokens_per_s"] / request["tokens_per_s"],
                          "short_p99_ratio": step["short_p99_s"] / request["short_p99_s"], "goal": goal, **head}),
              flush=True)


async def _load(url: str, clients: int, requests: int, adapters: list[str], max_tokens: int, seed: int) -> dict:
    import httpx

    latencies, failures, tokens, served = [], 0, 0, []
    rng = random.Random(seed)
    plan = [[(rng.choice(adapters), rng.choice(PROMPTS)) for _ in range(requests)] for _ in range(clients)]

    async def client(jobs):
        nonlocal failures, tokens
        async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {KEY}"}) as http:
            for adapter, prompt in jobs:
                latency, generated, r = await _complete(http, url, {"model": adapter, "prompt": prompt,
                                                                     "max_tokens": max_tokens, "temperature": 0})
                latencies.append(latency)
                served.append((adapter, r.headers.get("x-peft-adapt-replica")))
                failures += generated is None
                tokens += generated or 0

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


def registry_with_adapters(work: Path, model_name: str, count: int):
    """A registry in `work` holding `count` random LoRA adapters (q, v; rank 8) of `model_name`, and their names."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_adapt import Registry
    from peft_adapt.models.backbone import resolve_model_path

    registry = Registry(work / "registry")
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_name))
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config, adapter_name="a0")
    for i in range(count):
        if i:
            model.add_adapter(f"a{i}", config)
        model.save_pretrained(work / "adapters", selected_adapters=[f"a{i}"])
        registry.import_peft(work / "adapters" / f"a{i}", base=model_name, name=f"adapter{i}")
    return registry, [f"adapter{i}" for i in range(count)]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--ray", action="store_true", help="serve --ray: 2 replicas against 1")
    parser.add_argument("--schedulers", action="store_true", help="continuous batching against whole requests")
    parser.add_argument("--long-tokens", type=int, default=400, help="with --schedulers: a long request's tokens")
    parser.add_argument("--repeats", type=int, default=3, help="with --schedulers: runs per workload (medians)")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        registry, names = registry_with_adapters(work, args.model, args.adapters)
        if args.schedulers:
            _compare_schedulers(args, registry, names, device)
            return
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
