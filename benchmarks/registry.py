"""Registry latency as it fills: add, get, and get + load, against plain peft loading from a folder.

For N = 10, 100, 1,000 adapters in one registry (and the same N adapter folders for the baseline), prints
one JSON line per figure:
- `registry_add_ms`: adding one more version (copy, fsync, rename, one transaction), median of 10;
- `registry_get_ms`: resolving `name@version` through the index, median of 200 random lookups;
- `get_and_load_ms`: registry lookup + checksum check + fingerprint check + peft `load_adapter`, against
  peft `load_adapter` straight from a folder path (the baseline), median of 20 random adapters.
The adapters are rank-8 LoRA on q_proj/v_proj of a Llama-shaped random model (`--hidden`, `--layers`).

With --shared, the same figures for the shared backend (PostgreSQL index + S3 files, both real servers started
on this machine: pgserver and moto) beside the embedded one (SQLite + folders), with their ratio; its
get + load is measured cold (fetched from the store into an empty cache) and warm (from the checked cache).
Loopback servers measure the software's overhead, not a network's latency.

    python benchmarks/registry.py [--sizes 10,100,1000] [--hidden 576 --layers 30] [--shared]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def main() -> None:
    from peft_adapt import Registry

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shared", action="store_true", help="also the shared backend (PostgreSQL + S3), ratios")
    args = parser.parse_args()
    if args.shared:
        from peft_adapt.testing.local_servers import BUCKET, local_team_servers, new_database

        with tempfile.TemporaryDirectory(prefix="bench_servers_") as servers_dir:
            with local_team_servers(Path(servers_dir)) as (postgres, _):
                run(args, lambda work: Registry(new_database(postgres), store=f"s3://{BUCKET}/{work.name}",
                                                cache=work / "cache"))
    else:
        run(args, None)


def run(args, open_shared) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_adapt import Registry
    from peft_adapt.formats import build_manifest, verify_checksums, write_manifest
    from peft_adapt.models.backbone import BaseSpec, load_backbone
    from peft_adapt.runtime.loading import check_same_base
    from peft_adapt.testing.tiny_models import build_tiny_model

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    work = Path(tempfile.mkdtemp(prefix="bench_registry_"))
    try:
        base_dir = build_tiny_model(work / "base", "llama", hidden_size=args.hidden, num_layers=args.layers)
        backbone = load_backbone(BaseSpec(model=str(base_dir), quantization="none"))
        # one adapter folder as `peft-adapt train` writes it: peft files + manifest
        source = work / "adapter"
        lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                              LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        lora.save_pretrained(source)
        write_manifest(source, build_manifest(source, base=BaseSpec(model=str(base_dir), quantization="none"),
                                              name="bench", domain="bench", method="lora", task="causal_lm",
                                              base_fingerprint=backbone.fingerprint))
        adapter_bytes = (source / "adapter_model.safetensors").stat().st_size
        registries = {"embedded": Registry(work / "registry")}
        if open_shared:
            registries["shared"] = open_shared(work)
        folders = work / "folders"
        peft_model = get_peft_model(backbone.model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        count = {kind: 0 for kind in registries}

        def get_and_load(registry, name: str, label: str) -> float:
            start = time.perf_counter()
            entry = registry.get(f"{name}@1")
            manifest = entry.manifest
            assert not verify_checksums(entry.path, manifest)
            check_same_base(manifest, backbone, entry.ref)
            peft_model.load_adapter(entry.path, adapter_name=label)
            took = _ms(start)
            peft_model.delete_adapter(label)
            return took

        for size in [int(s) for s in args.sizes.split(",")]:
            medians = {}
            for kind, registry in registries.items():
                add_times = []
                while count[kind] < size:
                    name = f"adapter-{count[kind]:05d}"
                    start = time.perf_counter()
                    registry.add(source, name=name)
                    add_times.append(_ms(start))
                    if kind == "embedded":
                        shutil.copytree(source, folders / name)
                    count[kind] += 1
                rng = random.Random(size)
                get_times = []
                for _ in range(200):
                    ref = f"adapter-{rng.randrange(size):05d}@1"
                    start = time.perf_counter()
                    registry.get(ref)
                    get_times.append(_ms(start))
                ours, theirs, warm = [], [], []
                for i in range(20):
                    name = f"adapter-{rng.randrange(size):05d}"
                    if kind == "shared":  # cold: nothing of it in this machine's cache yet
                        shutil.rmtree(registry.objects.cache, ignore_errors=True)
                    ours.append(get_and_load(registry, name, f"ours{i}"))
                    if kind == "shared":
                        warm.append(get_and_load(registry, name, f"warm{i}"))
                        continue
                    start = time.perf_counter()
                    peft_model.load_adapter(folders / name, adapter_name=f"peft{i}")
                    theirs.append(_ms(start))
                    peft_model.delete_adapter(f"peft{i}")
                common = {"backend": kind, "adapters_in_registry": size, "adapter_bytes": adapter_bytes,
                          "device": device}
                medians[kind] = {"registry_add_ms": statistics.median(add_times[-10:]),
                                 "registry_get_ms": statistics.median(get_times),
                                 "get_and_load_ms": statistics.median(ours)}
                lines = [
                    {"name": "registry_add_ms", "value": medians[kind]["registry_add_ms"], "baseline": None, "ratio": None},
                    {"name": "registry_get_ms", "value": medians[kind]["registry_get_ms"], "baseline": None, "ratio": None},
                ]
                if kind == "embedded":
                    lines.append({"name": "get_and_load_ms", "value": statistics.median(ours),
                                  "baseline": statistics.median(theirs),
                                  "ratio": statistics.median(ours) / statistics.median(theirs),
                                  "baseline_is": "peft load_adapter from a folder path"})
                else:
                    medians[kind]["get_and_load_warm_ms"] = statistics.median(warm)
                    lines += [{"name": "get_and_load_ms", "value": statistics.median(ours), "cache": "cold"},
                              {"name": "get_and_load_warm_ms", "value": statistics.median(warm), "cache": "warm"}]
                for line in lines:
                    print(json.dumps(line | common), flush=True)
            if "shared" in medians:  # shared against embedded, figure by figure (warm load against the folder load)
                for name, value in medians["shared"].items():
                    embedded = medians["embedded"][name.replace("_warm", "")]
                    print(json.dumps({"name": f"shared_vs_embedded_{name}", "ratio": value / embedded,
                                      "shared": value, "embedded": embedded, "adapters_in_registry": size,
                                      "device": device}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
