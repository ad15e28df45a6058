"""Seeded requests batched together (per-row generators) against one batch per seed (the batcher before issue 31
grouped jobs by their sampling settings, seed included, and ran the groups one after another), in one process on
the same runtime: N requests over 4 adapters, each with its own seed, `--tokens` new tokens each. Prints a JSON line
per side (seconds, generated tokens/s; medians of `--repeats`, interleaved) and the ratio line.

    python benchmarks/seeded_batching.py [--model smollm2-135m] [--quantization nf4] [--requests 16] [--tokens 60]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPTS = ["Question: What is a Python decorator?\nAnswer:", "The stock market today", "def merge_sorted(a, b):",
           "Symptoms of the common cold include"]


def run(runtime, prompts, names, samplings) -> int:
    generated = 0
    for step in runtime.generate_stream(prompts, names, samplings):
        generated += sum(token is not None for token in step)
    return generated


def main() -> None:
    import torch
    from test_runtime import make_lora

    from peft_adapt import AdapterRuntime
    from peft_adapt.models.backbone import resolve_model_path
    from peft_adapt.runtime.decoding import Sampling

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = resolve_model_path(args.model)
        folders = [str(make_lora(Path(base), Path(tmp) / f"a{i}", 8, ["q_proj", "v_proj"], seed=i)) for i in range(4)]
        runtime = AdapterRuntime(args.model, quantization=args.quantization)
        for folder in folders:
            runtime.load(folder)
        prompts = [PROMPTS[i % 4] for i in range(args.requests)]
        names = [folders[i % 4] for i in range(args.requests)]
        samplings = [Sampling(args.tokens, min_new_tokens=args.tokens, do_sample=True, temperature=0.8, seed=100 + i)
                     for i in range(args.requests)]
        sides = {
            "ours: one batch, a generator per row": lambda: run(runtime, prompts, names, samplings),
            "baseline: one batch per seed": lambda: sum(run(runtime, [p], [n], s) for p, n, s in
                                                        zip(prompts, names, samplings)),
        }
        seconds = {side: [] for side in sides}
        tokens = {}
        for _ in range(args.repeats):
            for side, work in sides.items():
                started = time.perf_counter()
                tokens[side] = work()
                seconds[side].append(time.perf_counter() - started)
        for side in sides:
            median = statistics.median(seconds[side])
            print(json.dumps({"side": side, "requests": args.requests, "tokens": tokens[side], "seconds": round(median, 2),
                              "tokens_per_s": round(tokens[side] / median, 1), "model": args.model,
                              "quantization": args.quantization, "threads": args.threads}), flush=True)
        ours, baseline = (statistics.median(seconds[s]) for s in sides)
        print(json.dumps({"tokens_per_s_ratio": round(baseline / ours, 2)}), flush=True)


if __name__ == "__main__":
    main()
