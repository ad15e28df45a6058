"""Amazon sentiment per domain on minilm-l6: LoRA on nf4, LoRA unquantized, head only, full fine-tune.

Runs `recipes/amazon_sentiment.yaml` four ways in one process, one after the other, and prints one JSON
line per (configuration, domain) with test accuracy, macro-F1, trainable parameters and wall time,
then a table. Needs ../shared/data (or $PEFT_ADAPT_DATA).

    python benchmarks/amazon_baselines.py [--domains books,dvd] [--configs lora_nf4,head_only] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "amazon_sentiment.yaml"
CONFIGS = {
    "lora_nf4": [],
    "lora_none": ["base.quantization=none"],
    "head_only": ["adapter=null", "freeze=all", "training.learning_rate=2e-3"],
    "full_finetune": ["adapter=null", "freeze=none", "base.quantization=none", "training.learning_rate=5e-5"],
}


def main() -> None:
    import torch

    from peft_adapt import load_recipe, train_domain

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domains", default="books,dvd,electronics,kitchen")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", default=None, help="where adapters go (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], help="extra recipe overrides for every run")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="amazon_baselines_"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    rows = []
    for config in args.configs.split(","):
        recipe = load_recipe(RECIPE, CONFIGS[config] + args.set)
        for domain in args.domains.split(","):
            result = train_domain(recipe, domain, out / config)
            test = result.metrics["test"]
            row = {
                "name": "amazon_sentiment", "config": config, "domain": domain,
                "accuracy": test["accuracy"], "macro_f1": test["macro_f1"],
                "trainable_parameters": result.metrics["trainable_parameters"],
                "train_seconds": result.metrics["train_seconds"], "steps": result.metrics["steps"], "device": device,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| config | " + " | ".join(args.domains.split(",")) + " | mean acc | trainable params | train s (sum) |")
    print("|---" * (len(args.domains.split(",")) + 4) + "|")
    for config in args.configs.split(","):
        mine = [r for r in rows if r["config"] == config]
        cells = " | ".join(f"{r['accuracy']:.1%} / {r['macro_f1']:.3f}" for r in mine)
        mean = sum(r["accuracy"] for r in mine) / len(mine)
        print(f"| {config} | {cells} | {mean:.1%} | {mine[0]['trainable_parameters']:,} | {sum(r['train_seconds'] for r in mine):.0f} |")


if __name__ == "__main__":
    main()
