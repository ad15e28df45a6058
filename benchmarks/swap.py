"""Hot-swap costs: switch latency with N resident adapters, load latency, bytes per resident adapter.

Prints JSON lines, ours against peft on the same base:
- `select_us` (p50 and p99 of `--switches` switches, N resident rank-8 adapters on the attention projections):
  choosing a different adapter than the last one: peft `set_adapter(name)`; ours, name -> slot and the batch's
  per-row index (`AdapterRuntime._batch`).
- `switch_us`: the switch as a request sees it: the choice plus the first adapted layer's forward on one token
  with the new adapter; `layer_us`: that layer's forward alone, with the adapter already chosen (the floor).
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


def _first_adapted_layer(model, kind):
    return next(m for m in model.modules() if isinstance(m, kind))


def main() -> None:
    import gc

    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from peft_adapt import AdapterRuntime, Registry
    from peft_adapt.formats import build_manifest, write_manifest
    from peft_adapt.methods.lora import LORA
    from peft_adapt.models.backbone import BaseSpec, load_backbone
    from peft_adapt.runtime.sites import AdaptedSite

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,10,100,1000")
    parser.add_argument("--peft-max", type=int, default=300, help="largest N tried with peft (it slows down as N grows)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--switches", type=int, default=2000)
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
        lora = LORA.read(template)
        runtime = AdapterRuntime(spec, initial_capacity=max(sizes) + 1)
        common = {"model": args.model, "quantization": args.quantization, "adapter": "lora r8 q,k,v,o", "device": device}

        # load latency: from the registry into the runtime, against peft load_adapter from a folder
        registry = Registry(work / "registry")
        write_manifest(template, build_manifest(template, base=spec, name="swap", domain="bench", method="lora",
                                                task="causal_lm", base_fingerprint=runtime.backbone.fingerprint))
        registry.add(template, name="swap")
        runtime.adapters._registry = registry
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

        resident, peft_count = 0, 1
        for n in sizes:
            while resident < n:
                runtime.load_weights(f"a{resident}", lora)
                resident += 1
            site = _first_adapted_layer(runtime.model, AdaptedSite)
            peft_layer = _first_adapted_layer(peft_model, LoraLayer)
            x = torch.randn(1, 1, site.base_layer.in_features, device=runtime.device)
            names = [f"a{i % n}" for i in range(args.switches)]

            def ours_select(name):
                runtime._batch(name, 1)

            def ours_switch(name):
                batch, _ = runtime._batch(name, 1)
                runtime.context.current = batch
                try:
                    site(x)
                finally:
                    runtime.context.current = None

            def ours_layer(name, batch=runtime._batch("a0", 1)[0]):
                runtime.context.current = batch
                try:
                    site(x)
                finally:
                    runtime.context.current = None

            def peft_select(name):
                peft_model.set_adapter(name)

            def peft_switch(name):
                peft_model.set_adapter(name)
                peft_layer(x)

            def peft_layer_alone(name):
                peft_layer(x)

            ours, theirs = {}, {}
            with torch.no_grad():
                for label, fn in (("select", ours_select), ("switch", ours_switch), ("layer", ours_layer)):
                    ours[label] = _switch_times(fn, names, gc)
                if n <= args.peft_max:
                    while peft_count < n:
                        peft_model.add_adapter(f"a{peft_count}", config)
                        peft_count += 1
                    few = names[: max(50, args.switches // max(1, n))]  # peft's switch slows as N grows
                    for label, fn in (("select", peft_select), ("switch", peft_switch), ("layer", peft_layer_alone)):
                        theirs[label] = _switch_times(fn, few, gc)
            for measure in ("select", "switch", "layer"):
                for label, index in (("p50", 0), ("p99", 1)):
                    value = _percentiles(ours[measure])[index]
                    baseline = _percentiles(theirs[measure])[index] if theirs else None
                    print(json.dumps({"name": f"{measure}_us_{label}", "resident": n, "value": value,
                                      "baseline": baseline, "ratio": value / baseline if baseline else None,
                                      "switches": len(names), "baseline_is": f"peft ({measure})" if theirs else
                                      f"peft not run above {args.peft_max}"} | common), flush=True)
        stats = runtime.stats()
        print(json.dumps({"name": "bytes_per_resident_adapter", "resident": stats["resident"],
                          "value": stats["stack_bytes"] / max(1, stats["resident"]), "baseline": lora.nbytes,
                          "ratio": stats["stack_bytes"] / max(1, stats["resident"]) / lora.nbytes,
                          "baseline_is": "the adapter's parameter bytes", "slots_allocated": stats["slots"]} | common),
              flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _switch_times(switch, names: list[str], gc) -> list[float]:
    """Microseconds per switch, after a warm-up and a collection (both sides alike; the collector stays on)."""
    for name in names[:20]:
        switch(name)
    gc.collect()
    times = []
    for name in names:
        start = time.perf_counter()
        switch(name)
        times.append((time.perf_counter() - start) * 1e6)
    return times


if __name__ == "__main__":
    main()
