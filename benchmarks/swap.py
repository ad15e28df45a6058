"""Hot-swap costs: switch latency with N resident adapters, load latency, bytes per resident adapter.

Prints JSON lines, ours against peft on the same base:
- `switch_us` (p50 and p99): with N resident rank-8 adapters on the attention projections, the work that
  makes a different adapter the active one: peft `set_adapter(name)`; ours, what a call does to pick its
  adapter (name -> slot, the per-row index), `AdapterRuntime._batch`. Neither includes a forward pass.
- `load_ms`: one adapter from the registry into the runtime (checksums, fingerprint check, read, write a
  slot) against peft `load_adapter` from a folder.
- `bytes_per_resident_adapter`: the runtime's stack bytes per resident adapter against the adapter's own
  parameter bytes (padding to the largest rank costs memory; here all ranks are equal).

    python benchmarks/swap.py [--sizes 1,10,100,1000] [--peft-max 300] [--model smollm2-135m|random]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from peft_adapt.backbone import BaseSpec, load_backbone
    from peft_adapt.manifest import build_manifest, write_json
    from peft_adapt.registry import Registry
    from peft_adapt.runtime import AdapterRuntime
    from peft_adapt.runtime.lora_weights import read_lora_weights

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,10,100,1000")
    parser.add_argument("--peft-max", type=int, default=300, help="largest N tried with peft (it slows down as N grows)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--switches", type=int, default=200)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    sizes = [int(s) for s in args.sizes.split(",")]
    spec = BaseSpec(model=args.model, quantization=args.quantization)
    work = Path(tempfile.mkdtemp(prefix="bench_swap_"))
    try:
        peft_backbone = load_backbone(spec)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
        peft_model = get_peft_model(peft_backbone.model, config, adapter_name="a0")
        peft_model.save_pretrained(work / "template", selected_adapters=["a0"])
        template = work / "template" / "a0"
        lora = read_lora_weights(template)
        runtime = AdapterRuntime(spec, initial_capacity=max(sizes) + 1, initial_rank=8)
        common = {"model": args.model, "quantization": args.quantization, "adapter": "lora r8 q,k,v,o", "device": device}

        # load latency: from the registry into the runtime, against peft load_adapter from a folder
        registry = Registry(work / "registry")
        write_json(template / "manifest.json", build_manifest(
            folder=template, name="swap", domain="bench", method="lora", task="causal_lm", base_model=args.model,
            base_fingerprint=runtime.backbone.fingerprint, quantization={"quantization": args.quantization},
            recipe={"base": {"model": args.model}, "task": {"type": "causal_lm"}}, data_sha256={}, metrics={},
        ))
        registry.add(template, name="swap")
        runtime._registry = registry
        ours, theirs = [], []
        for i in range(10):
            start = time.perf_counter()
            runtime.load("swap")
            ours.append((time.perf_counter() - start) * 1000)
            runtime.unload("swap")
            start = time.perf_counter()
            peft_model.load_adapter(template, adapter_name=f"load{i}")
            theirs.append((time.perf_counter() - start) * 1000)
            peft_model.delete_adapter(f"load{i}")
        print(json.dumps({"name": "load_ms", "value": statistics.median(ours), "baseline": statistics.median(theirs),
                          "ratio": statistics.median(ours) / statistics.median(theirs),
                          "baseline_is": "peft load_adapter from a folder"} | common), flush=True)

        resident = 0
        peft_count = 1
        for n in sizes:
            while resident < n:
                runtime.load_lora(f"a{resident}", lora)
                resident += 1
            names = [f"a{i % n}" for i in range(args.switches)]
            ours = []
            for name in names:
                start = time.perf_counter()
                runtime._batch(name, 1)
                ours.append((time.perf_counter() - start) * 1e6)
            theirs = None
            if n <= args.peft_max:
                while peft_count < n:
                    peft_model.add_adapter(f"a{peft_count}", config)
                    peft_count += 1
                theirs = []
                for name in names:
                    start = time.perf_counter()
                    peft_model.set_adapter(name)
                    theirs.append((time.perf_counter() - start) * 1e6)
            for label, index in (("p50", 0), ("p99", 1)):
                value = _percentiles(ours)[index]
                baseline = _percentiles(theirs)[index] if theirs else None
                print(json.dumps({"name": f"switch_us_{label}", "resident": n, "value": value, "baseline": baseline,
                                  "ratio": value / baseline if baseline else None,
                                  "baseline_is": "peft set_adapter" if theirs else f"peft not run above {args.peft_max}"}
                                 | common), flush=True)
        stats = runtime.stats()
        print(json.dumps({"name": "bytes_per_resident_adapter", "resident": stats["resident"],
                          "value": stats["stack_bytes"] / max(1, stats["resident"]), "baseline": lora.nbytes,
                          "ratio": stats["stack_bytes"] / max(1, stats["resident"]) / lora.nbytes,
                          "baseline_is": "the adapter's parameter bytes", "slots_allocated": stats["slots"]} | common),
              flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
