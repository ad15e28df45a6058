"""Judge saved domain-adaptation runs again with the safeguard's current criteria, without training anything.

`amazon_cross_domain.py --out DIR` keeps every adapter it trains: `DIR/runs/<method>-<seed>/<target>/<source>` (the
raw adapted adapter, trained with `safeguard: false`) beside `DIR/runs/source_only-<seed>/<source>`. Training them
is the hours; judging them is minutes. This loads each adapted adapter and its source-only one, rebuilds the
source's held-out rows and the target's unlabeled rows from the recipe saved in the adapter's manifest, runs
`training.safeguard.judge` (the current code: a new criterion is measured on every saved run at once), and only
then scores both on the target's test labels for the oracle. Prints one JSON line per run
(`safeguard_replay`), the same fields as the benchmark's `amazon_cross_domain_safeguard` lines (so
`amazon_table.py` reads them), then how often each criterion alone agrees with the oracle.

    python benchmarks/safeguard_replay.py DIR [DIR ...] [--methods dann,self_training] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RUN = re.compile(r"(?P<method>[a-z_+]+)-(?P<seed>\d+)$")


def saved_runs(folders: list[Path], methods: set[str] | None) -> list[tuple[str, int, Path, Path]]:
    """(method, seed, adapted folder, source-only folder) for every adapted adapter whose source-only one is saved."""
    found = []
    for folder in folders:
        folder = folder / "runs" if (folder / "runs").is_dir() else folder  # the --out folder, or its runs/
        for method_dir in sorted(folder.glob("*-*")):
            match = RUN.match(method_dir.name)
            if not match or match["method"] == "source_only" or (methods and match["method"] not in methods):
                continue
            for adapted in sorted(method_dir.glob("*/*/manifest.json")):
                source = adapted.parent.name
                plain = folder / f"source_only-{match['seed']}" / source
                if (plain / "manifest.json").exists():
                    found.append((match["method"], int(match["seed"]), adapted.parent, plain))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="amazon_cross_domain.py --out folders")
    parser.add_argument("--methods", help="comma-separated; default: every method saved")
    parser.add_argument("--limit", type=int, help="judge at most this many runs")
    args = parser.parse_args()

    import torch
    from amazon_table import votes

    from peft_adapt import parse_recipe
    from peft_adapt.adaptation.features import read_target_texts, tokenize_target
    from peft_adapt.data import LabelMap, TaskSpec, read_eval_file, tokenize
    from peft_adapt.data.examples import read_domain
    from peft_adapt.data.tokenize import tokenize_domain
    from peft_adapt.runtime.loading import load_trained
    from peft_adapt.training.evaluation import evaluate_task
    from peft_adapt.training.safeguard import judge, source_labels

    torch.manual_seed(0)
    runs = saved_runs(args.folders, set(args.methods.split(",")) if args.methods else None)[: args.limit]
    if not runs:
        raise SystemExit(f"no saved run with its source-only adapter under {', '.join(map(str, args.folders))}/runs")

    def test_accuracy(loaded, path: Path) -> float:
        labels = LabelMap(loaded.manifest.labels)
        spec = TaskSpec.model_validate(loaded.manifest.task_spec)
        rows = tokenize(read_eval_file(spec, path, labels), loaded.backbone.tokenizer, spec)
        return evaluate_task(loaded.model, rows, "classification", loaded.backbone.tokenizer.pad_token_id,
                             len(labels.names), 32)["accuracy"]

    lines = []
    for method, seed, adapted_dir, plain_dir in runs:
        adapted, plain = load_trained(adapted_dir), load_trained(plain_dir)
        recipe = parse_recipe(adapted.manifest.recipe)
        source = plain_dir.name
        spec, t, target = recipe.domain(source), recipe.training, recipe.domain_adaptation
        # the source's training and held-out rows as training split them (same recipe, seed and row cap)
        examples = read_domain(recipe.task, recipe.data_path(spec.train), None, None, t.seed, t.max_train_rows,
                               t.max_eval_rows, t.shots)
        tokenizer = plain.backbone.tokenizer
        data = tokenize_domain(examples, tokenizer, recipe.task)
        texts = read_target_texts(Path(target.target), max_rows=target.max_target_rows)
        target_rows = tokenize_target(texts, tokenizer, recipe.task.max_length)
        judgement = judge(adapted.model, plain.model, data.eval, target_rows, tokenizer.pad_token_id,
                          class_labels=source_labels(data))
        # the oracle, read only now: both adapters on the target's test labels
        target_domain = adapted_dir.parent.name
        test_path = Path(target.target).with_name(f"{target_domain}.test.jsonl")
        raw, base = test_accuracy(adapted, test_path), test_accuracy(plain, test_path)
        oracle = "adapted" if raw > base else "source_only" if raw < base else "either"
        line = {"name": "safeguard_replay", "pair": f"{source}->{target_domain}", "method": method, "seed": seed,
                "rows": t.max_train_rows, "selected": judgement.selected, "oracle": oracle,
                "agrees": oracle in ("either", judgement.selected), "why": judgement.why, "adapted_accuracy": raw,
                "source_only_accuracy": base, "criteria": judgement.criteria}
        print(json.dumps(line), flush=True)
        lines.append(line)
        del adapted, plain

    criteria = {k: 0 for k in votes(lines[0]["criteria"])}
    for line in lines:
        for k, vote in votes(line["criteria"]).items():
            criteria[k] += line["oracle"] in ("either", vote)
    print(json.dumps({"name": "safeguard_replay_summary", "runs": len(lines),
                      "safeguard_agrees": sum(line["agrees"] for line in lines),
                      "each_criterion_agrees": criteria}))


if __name__ == "__main__":
    main()
