"""GGUF export checked by llama.cpp (llama-cpp-python) on the built-in SmolLM2-135M: the folded model (f32, f16, q8_0)
and the built-in base + GGUF LoRA, against the adapter as the runtime serves it, then the round trip.

Trains a LoRA (r 16, all linear layers; medical text from ../shared/data, or Python docs without it) on the base in
each of `--quantizations`, exports it, and prints one JSON line per file llama.cpp ran: top-1 agreement and max /
mean |logit difference| against the unmerged model as served, beside the noise floor (llama.cpp running the base as
training saw it, f32, against the base as served), and llama.cpp's tokenization agreement. The round trip: the
exported f32 model.gguf named as a base (`base: {model: .../model.gguf}`) and served by the runtime against the
adapter as served (top-1 on the same probe).

    python benchmarks/gguf_export.py [--steps 25] [--quantizations nf4,none] [--probe-tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch
    from export import write_train_and_probe  # benchmarks/export.py: the same train and probe text

    from peft_adapt import AdapterRuntime, Registry, parse_recipe, train_domain
    from peft_adapt.merge.fidelity import compare_logits, probe_token_ids
    from peft_adapt.merge.gguf_export import export_gguf

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--quantizations", default="nf4,none")
    parser.add_argument("--outtypes", default="f32,f16,q8_0")
    parser.add_argument("--probe-tokens", type=int, default=1024)
    args = parser.parse_args()
    device = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    work = Path(tempfile.mkdtemp(prefix="bench_gguf_"))
    try:
        corpus = write_train_and_probe(work)
        registry = Registry(work / "registry")
        for quantization in args.quantizations.split(","):
            recipe = parse_recipe({
                "name": "gguf-bench", "base": {"model": args.model, "quantization": quantization},
                "task": {"type": "causal_lm", "max_length": 128, "packing": True},
                "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
                "training": {"max_steps": args.steps, "batch_size": 4, "learning_rate": 1e-3, "seed": 0},
                "domains": {"medical": {"train": str(work / "train.jsonl"), "eval": str(work / "probe.jsonl")}},
            })
            train_domain(recipe, "medical", work / f"run-{quantization}")
            entry = registry.add(work / f"run-{quantization}" / "medical", name=f"medical-{quantization}")
            common = {"model": args.model, "adapter": f"lora r16 all-linear, {quantization}", "steps": args.steps,
                      "corpus": corpus, "device": device}
            exports = [(f"model_{t}", {"outtype": t}) for t in args.outtypes.split(",")]
            exports.append(("adapter_f32", {"adapter_only": True}))
            for label, options in exports:
                started = time.perf_counter()
                report = export_gguf(registry, entry.ref, work / f"{quantization}-{label}", fidelity="logits",
                                     probe=work / "probe.jsonl", probe_tokens=args.probe_tokens, **options)
                size = sum(f.stat().st_size for f in (work / f"{quantization}-{label}").glob("*.gguf"))
                for variant, scores in report["variants"].items():
                    print(json.dumps({"name": "gguf_fidelity", **common, "export": label, "run": variant, **scores,
                                      "noise_floor_top1": report["noise_floor"]["top1_agreement"],
                                      "noise_floor_max_abs_logit_diff": report["noise_floor"]["max_abs_logit_diff"],
                                      "tokenization": report["tokenization"], "gguf_bytes": size,
                                      **({"source_base_alone_top1": report["source_base"]["top1_agreement"]}
                                         if "source_base" in report and "the GGUF the base came from" in variant
                                         else {}),
                                      "export_seconds": report["export_seconds"],
                                      "seconds_with_fidelity": time.perf_counter() - started}), flush=True)
            # the round trip: the exported f32 model.gguf as a base, served, against the adapter as served
            folded = work / f"{quantization}-model_f32" / "model.gguf"
            if folded.is_file():
                runtime = AdapterRuntime(args.model, quantization=quantization, device="cpu")
                probes = probe_token_ids(runtime.tokenizer, entry.manifest, work / "probe.jsonl", args.probe_tokens)
                runtime.load(str(entry.path))
                served = runtime.logits(probes, adapters=str(entry.path))
                del runtime
                back = AdapterRuntime(str(folded), quantization="none", device="cpu")
                scores = compare_logits(back.logits(probes, adapters=None), served)
                print(json.dumps({"name": "gguf_round_trip", **common, "base": "exported model.gguf (f32) as a base, "
                                  "unquantized", **scores}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
