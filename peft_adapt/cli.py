"""`peft-adapt`: a thin front end. It parses arguments, calls the library and prints; nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import UserInputError


def _cmd_train(args) -> int:
    from .recipe import load_recipe
    from .train import train_recipe

    recipe = load_recipe(args.recipe, args.set)
    out = Path(args.out) if args.out else Path("runs") / (recipe.name or Path(args.recipe).stem)
    results = train_recipe(recipe, out, args.domain)
    for r in results:
        shown = {k: v for k, v in r.metrics.get("test", r.metrics["eval"]).items()}
        split = "test" if "test" in r.metrics else "eval"
        print(f"{r.domain}: {split} {json.dumps(shown)}  trainable={r.metrics['trainable_parameters']:,}  "
              f"time={r.metrics['train_seconds']:.0f}s  -> {r.out_dir}")
    return 0


def _cmd_eval(args) -> int:
    from .evaluation import evaluate_file

    metrics = evaluate_file(args.adapter, args.data, quantization=args.quantization, device=args.device,
                            batch_size=args.batch_size, max_rows=args.max_rows, force=args.force)
    print(json.dumps({"adapter": str(args.adapter), "data": str(args.data), **metrics}))
    return 0


def _cmd_quickstart(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the quickstart is offline by definition: never wait on the hub
    from .quickstart import format_report, run_quickstart

    report = run_quickstart(
        out=args.out, domains=tuple(args.domains.split(",")), steps=args.steps, batch_size=args.batch_size,
        max_length=args.max_length, eval_blocks=args.eval_blocks, model=args.model,
        quantization=args.quantization, rank=args.rank, learning_rate=args.learning_rate,
    )
    print(format_report(report))
    print(f"report: {Path(args.out) / 'report.json'}  heatmap: {Path(args.out) / 'perplexity_heatmap.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-adapt", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one adapter per domain of a YAML recipe")
    p.add_argument("recipe", help="the recipe YAML file")
    p.add_argument("--domain", action="append", help="train only this domain (repeatable)")
    p.add_argument("--out", help="output folder (default: runs/<recipe name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set base.quantization=none; VALUE null removes it")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained adapter folder on a data file")
    p.add_argument("adapter", help="a folder written by `peft-adapt train`")
    p.add_argument("data", help="JSONL, CSV, Parquet or a saved datasets folder")
    p.add_argument("--quantization", choices=["none", "int8", "nf4", "fp4"], help="load the base this way instead")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-rows", type=int, help="evaluate only the first N rows")
    p.add_argument("--force", action="store_true", help="load even if the base fingerprint differs")
    p.set_defaults(func=_cmd_eval)

    from .corpora import CORPORA

    p = sub.add_parser("quickstart", help="offline demo: one LoRA per built-in domain, perplexity table")
    p.add_argument("--out", default="quickstart_out", help="output folder (default: quickstart_out)")
    p.add_argument("--domains", default=",".join(CORPORA), help=f"comma-separated, from {', '.join(CORPORA)}")
    p.add_argument("--steps", type=int, default=20, help="training steps per domain (default 20)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128, help="tokens per training block")
    p.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks of max-length tokens per domain")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quantization", default="nf4", choices=["none", "int8", "nf4", "fp4"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.set_defaults(func=_cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
