"""Seq2seq on a real small task: an AG News article in, its topic's name out (World, Sports, Business, Sci/Tech).

No pre-trained encoder-decoder is reachable offline, so the base is a small random T5 (or BART) built from a config:
the figure says what a LoRA on the nf4 base learns that the base cannot, and that the export reproduces the
adapter as served, not what a real Flan-T5 would score. Prints JSON lines: the base and the adapter on held-out
rows (loss, exact match, ROUGE-L), then the export's fidelity.

    python benchmarks/seq2seq_news_topic.py --steps 300 --rows 2000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("PEFT_ADAPT_DATA", "../shared/data"))
    parser.add_argument("--model-type", default="t5", choices=["t5", "bart"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rows", type=int, default=2000, help="training rows (the next 200 are held out)")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from peft_adapt import Registry, export_model, parse_recipe, train_domain
    from peft_adapt.testing.tiny_models import build_tiny_architecture
    from peft_adapt.training.evaluation import evaluate_file

    source = Path(args.data) / "domain_text" / "news.jsonl"
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()]
    pairs = [{"prompt": r["text"], "completion": r["label_name"]} for r in rows][: args.rows + 200]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train, held_out = root / "train.jsonl", root / "test.jsonl"
        train.write_text("".join(json.dumps(p) + "\n" for p in pairs[: args.rows]))
        held_out.write_text("".join(json.dumps(p) + "\n" for p in pairs[args.rows :]))
        base = build_tiny_architecture(root / args.model_type, args.model_type)
        recipe = {"base": {"model": str(base), "quantization": args.quantization},
                  "task": {"type": "seq2seq", "max_length": 128},
                  "adapter": {"method": "lora", "r": 16, "alpha": 32},
                  "training": {"max_steps": args.steps, "batch_size": 16, "learning_rate": 5e-3, "seed": 0,
                               "threads": args.threads},
                  "domains": {"news-topic": {"train": str(train), "test": str(held_out)}}}
        result = train_domain(parse_recipe(recipe), "news-topic", root / "run")
        base_scores = evaluate_file(result.out_dir, held_out, base_only=True)
        setting = {"model": f"tiny random {args.model_type}", "quantization": args.quantization, "steps": args.steps,
                   "train_rows": args.rows, "held_out_rows": len(pairs) - args.rows, "threads": args.threads}
        for name, scores in (("base", base_scores), ("lora", result.metrics["test"])):
            print(json.dumps(setting | {"model_with": name} | {k: scores[k] for k in ("loss", "exact_match", "rouge_l")}))
        registry = Registry(root / "reg")
        registry.add(result.out_dir, name="news-topic")
        report = export_model(registry, "news-topic", root / "export", dtype="fp32", probe=held_out, fidelity="logits")
        print(json.dumps(setting | {"export": "fp32", **report["variants"]["export_fp32"],
                                    "noise_floor_top1": report["noise_floor"]["top1_agreement"],
                                    "probe_tokens": report["probe_tokens"]}))


if __name__ == "__main__":
    main()
