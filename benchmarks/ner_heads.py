"""CoNLL-2003 NER: the softmax head against the CRF output layer (and, with --full, full fine-tuning), from
`recipes/conll2003_ner.yaml` (minilm-l6, LoRA r16 on nf4), one process, one JSON line per head with test entity F1.

    python benchmarks/ner_heads.py --rows 2000 --epochs 1 --test-rows 1000   # CPU: minutes
    python benchmarks/ner_heads.py --full                                     # the full recipe, 2 epochs (a GPU)
    python benchmarks/ner_heads.py --heads full_fine_tune --epochs 1          # one head
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "conll2003_ner.yaml"
FULL = ["adapter=null", "freeze=none", "base.quantization=none", "training.learning_rate=5e-5"]


def main() -> None:
    from peft_adapt import load_recipe, train_domain

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, help="training sentences (default: all 14,039)")
    parser.add_argument("--test-rows", type=int, help="test sentences (default: all 3,453)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--full", action="store_true", help="also full fine-tuning (unquantized, lr 5e-5)")
    parser.add_argument("--heads", help="only these, comma-separated (softmax, crf, full_fine_tune)")
    args = parser.parse_args()
    common = [f"training.epochs={args.epochs}", "training.checkpoint_steps=null"]
    if args.rows:
        common.append(f"training.max_train_rows={args.rows}")
    if args.test_rows:
        common.append(f"training.max_eval_rows={args.test_rows}")
    heads = {"softmax": [], "crf": ["task.crf=true"]}
    if args.full:
        heads["full_fine_tune"] = FULL
    if args.heads:
        heads["full_fine_tune"] = heads.get("full_fine_tune") or FULL
        heads = {h: heads[h] for h in args.heads.split(",")}
    with tempfile.TemporaryDirectory() as out:
        for head, overrides in heads.items():
            recipe = load_recipe(RECIPE, common + overrides)
            started = time.perf_counter()
            result = train_domain(recipe, "conll2003", Path(out) / head, progress_label=f"conll2003/{head}")
            test = result.metrics["test"]
            print(json.dumps({"benchmark": "ner_heads", "head": head, "test_f1": test["f1"],
                              "test_precision": test["precision"], "test_recall": test["recall"],
                              "word_accuracy": test["word_accuracy"], "train_rows": result.metrics["rows"]["train"],
                              "epochs": args.epochs, "train_seconds": result.metrics["train_seconds"],
                              "wall_seconds": time.perf_counter() - started}), flush=True)
            del result


if __name__ == "__main__":
    main()
