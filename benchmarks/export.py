"""Export fidelity and time: ours against merging into the original weights and peft's merge_and_unload.

Trains a LoRA adapter on the nf4 base (rank 16, all linear layers; medical text from ../shared/data, or
the quickstart's Python docs without it), then prints one JSON line per variant, each against the
unmerged model (nf4 base + adapter, as served) on held-out probe text: max and mean |logit difference|
and top-1 agreement, beside the noise floor (the nf4 base as served against its own dequantized fp32
copy). Variants: our default export (folded into the dequantized weights; bf16 and fp32), ours into the
original weights, peft `merge_and_unload` on the 4-bit model (it requantizes), and the same after the
model has run inference (the repack trap of DESIGN.md). Then export time against a plain
`save_pretrained` of the base.

    python benchmarks/export.py [--steps 25] [--model smollm2-135m] [--probe-tokens 1536]
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


def write_train_and_probe(work: Path) -> str:
    """`train.jsonl` (3/4) and `probe.jsonl` (1/4) in `work`: medical text from ../shared/data, or the Python docs
    without it; returns which."""
    from peft_adapt.training.recipe import data_root

    medical = data_root() / "domain_text" / "medical.jsonl"
    if medical.is_file():
        rows = [json.loads(line) for line in medical.read_text().splitlines()[:600]]
        corpus = "medical (../shared/data/domain_text)"
    else:
        import pydoc_data.topics

        rows = [{"text": t} for t in list(pydoc_data.topics.topics.values())[:300]]
        corpus = "python docs (pydoc_data)"
    train, probe = rows[: len(rows) * 3 // 4], rows[len(rows) * 3 // 4 :]
    (work / "train.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in train))
    (work / "probe.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in probe))
    return corpus


def main() -> None:
    import torch
    from peft import PeftModel

    from peft_adapt import AdapterRuntime, Registry, export_model, parse_recipe, train_domain
    from peft_adapt.merge.fidelity import compare_logits
    from peft_adapt.models.backbone import BaseSpec, load_backbone

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--probe-tokens", type=int, default=1536)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    work = Path(tempfile.mkdtemp(prefix="bench_export_"))
    try:
        corpus = write_train_and_probe(work)
        recipe = parse_recipe({
            "name": "export-bench", "base": {"model": args.model, "quantization": "nf4"},
            "task": {"type": "causal_lm", "max_length": 128, "packing": True},
            "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "training": {"max_steps": args.steps, "batch_size": 4, "learning_rate": 1e-3, "seed": 0},
            "domains": {"medical": {"train": str(work / "train.jsonl"), "eval": str(work / "probe.jsonl")}},
        })
        result = train_domain(recipe, "medical", work / "run")
        del result
        registry = Registry(work / "registry")
        entry = registry.add(work / "run" / "medical")
        common = {"model": args.model, "adapter": "lora r16 all-linear, nf4", "steps": args.steps, "corpus": corpus,
                  "device": device}

        reports = {}
        for label, options in (("ours_default_bf16", {"dtype": "bf16"}), ("ours_default_fp32", {"dtype": "fp32"}),
                               ("ours_original_weights_fp32", {"dtype": "fp32", "base_weights": "original"})):
            reports[label] = export_model(registry, entry.ref, work / label, probe=work / "probe.jsonl",
                                          probe_tokens=args.probe_tokens, fidelity="logits", **options)
        floor = reports["ours_default_fp32"]["noise_floor"]
        for label, report in reports.items():
            (scores,) = report["variants"].values()
            print(json.dumps({"name": "export_fidelity", "variant": label, **scores,
                              "noise_floor_top1": floor["top1_agreement"],
                              "probe_tokens": report["probe_tokens"]} | common), flush=True)

        # peft merge_and_unload on the 4-bit model, before and after the model has run inference
        from transformers import AutoTokenizer

        from peft_adapt.merge.fidelity import probe_token_ids
        from peft_adapt.models.backbone import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
        probes = probe_token_ids(tokenizer, entry.manifest, work / "probe.jsonl", args.probe_tokens)
        runtime = AdapterRuntime(args.model, quantization="nf4")
        runtime.load(str(entry.path))
        unmerged = runtime.logits(probes, adapters=str(entry.path))
        del runtime
        for label, infer_first in (("peft_merge_and_unload_4bit", False), ("peft_merge_and_unload_4bit_after_inference", True)):
            base = load_backbone(BaseSpec(model=args.model, quantization="nf4")).model.eval()
            if infer_first:
                with torch.no_grad():
                    base(input_ids=probes[:1])
            merged = PeftModel.from_pretrained(base, entry.path).merge_and_unload().eval()
            with torch.no_grad():
                logits = merged(input_ids=probes).logits.float()
            print(json.dumps({"name": "export_fidelity", "variant": label, **compare_logits(logits, unmerged),
                              "noise_floor_top1": floor["top1_agreement"], "probe_tokens": int(probes.numel())}
                             | common), flush=True)
            del merged, base

        # time: our export (no measurement) against saving the base as it is
        start = time.perf_counter()
        export_model(registry, entry.ref, work / "timed", dtype="bf16", fidelity="none")
        ours = time.perf_counter() - start
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=torch.bfloat16).save_pretrained(work / "plain")
        plain = time.perf_counter() - start
        print(json.dumps({"name": "export_seconds", "value": ours, "baseline": plain, "ratio": ours / plain,
                          "baseline_is": "load + save_pretrained of the base in bf16"} | common), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
