"""Building a router over k signed adapters: the expanded Mahalanobis distance (ours) against the per-row, per-domain
difference it replaced (baseline), side by side in one process, on random signatures of SmolLM2-135M's width (576)
and the signature's row count (512). Prints one JSON line per k and side: the build's seconds and the process's
peak RSS so far (ours runs first at each k, so a rise on the baseline's line is the baseline's own).

    python benchmarks/router_build.py [--names 2,4,8,16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft_adapt.routing import router as routing  # noqa: E402


def direct_distances(self, x: torch.Tensor) -> torch.Tensor:
    """What `_Discriminant.distances` computed before: every row's difference from every mean."""
    diff = x.double().unsqueeze(1) - self.means.unsqueeze(0)
    return torch.einsum("rdh,hk,rdk->rd", diff, self.precision, diff)


def build(k: int, width: int, rows: int) -> float:
    torch.manual_seed(k)
    signatures = [routing.Signature(torch.randn(rows, width) + 0.3 * i, 0, 64.0) for i in range(k)]
    started = time.perf_counter()
    routing.Router([f"a{i}" for i in range(k)], signatures)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--names", default="2,4,8,16")
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    expanded = routing._Discriminant.distances
    for k in map(int, args.names.split(",")):
        seconds = {}
        for side, distances in (("ours", expanded), ("baseline", direct_distances)):
            routing._Discriminant.distances = distances
            seconds[side] = build(k, args.width, args.rows)
            peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(json.dumps({"names": k, "side": side, "seconds": round(seconds[side], 3),
                              "process_peak_rss_mib_so_far": round(peak_mib), "threads": args.threads}), flush=True)
        print(json.dumps({"names": k, "speedup": round(seconds["baseline"] / seconds["ours"], 2)}), flush=True)
    routing._Discriminant.distances = expanded


if __name__ == "__main__":
    main()
