"""Registry latency as it fills: add, get, and get + load, against plain peft loading from a folder.

For N = 10, 100, 1,000 adapters in one registry (and the same N adapter folders for the baseline), prints
one JSON line per figure:
- `registry_add_ms`: adding one more version (copy, fsync, rename, one transaction), median of 10;
- `registry_get_ms`: resolving `name@version` through the index, median of 200 random lookups;
- `get_and_load_ms`: registry lookup + checksum check + fingerprint check + peft `load_adapter`, against
  peft `load_adapter` straight from a folder path (the baseline), median of 20 random adapters.
The adapters are rank-8 LoRA on q_proj/v_proj of a Llama-shaped random model (`--hidden`, `--layers`).

    python benchmarks/registry.py [--sizes 10,100,1000] [--hidden 576 --layers 30]
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
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_adapt.backbone import BaseSpec, load_backbone
    from peft_adapt.loading import check_base_fits
    from peft_adapt.formats import build_manifest, verify_checksums, write_manifest
    from peft_adapt.registry import Registry
    from peft_adapt.testing import build_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
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
        registry = Registry(work / "registry")
        folders = work / "folders"
        peft_model = get_peft_model(backbone.model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        count = 0
        for size in [int(s) for s in args.sizes.split(",")]:
            add_times = []
            while count < size:
                name = f"adapter-{count:05d}"
                start = time.perf_counter()
                registry.add(source, name=name)
                add_times.append(_ms(start))
                shutil.copytree(source, folders / name)
                count += 1
            rng = random.Random(size)
            get_times = []
            for _ in range(200):
                ref = f"adapter-{rng.randrange(count):05d}@1"
                start = time.perf_counter()
                registry.get(ref)
                get_times.append(_ms(start))
            ours, theirs = [], []
            for i in range(20):
                name = f"adapter-{rng.randrange(count):05d}"
                start = time.perf_counter()
                entry = registry.get(f"{name}@1")
                manifest = entry.manifest
                assert not verify_checksums(entry.path, manifest)
                check_base_fits(manifest, backbone, entry.ref)
                peft_model.load_adapter(entry.path, adapter_name=f"ours{i}")
                ours.append(_ms(start))
                start = time.perf_counter()
                peft_model.load_adapter(folders / name, adapter_name=f"peft{i}")
                theirs.append(_ms(start))
                peft_model.delete_adapter(f"ours{i}")
                peft_model.delete_adapter(f"peft{i}")
            common = {"adapters_in_registry": count, "adapter_bytes": adapter_bytes, "device": device}
            lines = [
                {"name": "registry_add_ms", "value": statistics.median(add_times[-10:]), "baseline": None, "ratio": None},
                {"name": "registry_get_ms", "value": statistics.median(get_times), "baseline": None, "ratio": None},
                {"name": "get_and_load_ms", "value": statistics.median(ours), "baseline": statistics.median(theirs),
                 "ratio": statistics.median(ours) / statistics.median(theirs),
                 "baseline_is": "peft load_adapter from a folder path"},
            ]
            for line in lines:
                print(json.dumps(line | common), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
