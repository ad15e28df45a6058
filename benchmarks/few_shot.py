"""A new domain in a few examples: leave-one-domain-out on the four Amazon domains (minilm-l6 nf4, LoRA r8).

For each held-out domain, from the other three: a fresh adapter; the meta-learned initialisation (`meta-train`,
Reptile over the three); an adapter trained on the three pooled; the linear merge (rank 8) of the three domains'
own adapters. Each initialisation is trained on K labeled rows per class of the held-out domain (`training.shots`,
drawn with the seed) for the same small number of steps and scored on its test set (400 rows); the held-out
domain's own full-data adapter is the reference. Prints one JSON line per (fold, K, seed, init) and a summary
per (K, init): mean and spread over seeds and folds.

    python benchmarks/few_shot.py --quick                       # CPU: K 8 and 32, one seed, 800-row adapters
    python benchmarks/few_shot.py --ks 8,32,128 --seeds 0,1,2   # the full grid (a GPU, or hours)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOMAINS = ("books", "dvd", "electronics", "kitchen")
INITS = ("fresh", "meta", "pooled", "merge")


def recipe(name: str, domains: dict, rows: int | None, **training) -> dict:
    return {
        "name": name, "base": {"model": "minilm-l6", "quantization": "nf4"},
        "task": {"type": "classification", "max_length": 96},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "seed": 0, "max_train_rows": rows,
                     "max_eval_rows": 400, "checkpoint_steps": None} | training,
        "domains": domains,
    }


def emit(**fields) -> None:
    print(json.dumps({"benchmark": "few_shot", **fields}), flush=True)


def main() -> None:
    from peft_adapt import Registry, combine_adapters, parse_recipe, train_domain
    from peft_adapt.training.meta import MetaSettings, meta_train
    from peft_adapt.training.recipe import data_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="K 8 and 32, one seed, 800-row source adapters")
    parser.add_argument("--ks", help="labeled rows per class (default 8,32,128; --quick 8,32)")
    parser.add_argument("--seeds", help="default 0,1,2 (--quick 0)")
    parser.add_argument("--folds", default=",".join(DOMAINS), help="held-out domains")
    parser.add_argument("--steps", type=int, default=20, help="few-shot training steps, every initialisation alike")
    parser.add_argument("--meta-steps", type=int, default=48)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--work", help="keep adapters here (default: a temporary folder)")
    parser.add_argument("--inits", default=",".join(INITS), help="initialisations to train (default: all)")
    args = parser.parse_args()
    ks = [int(k) for k in (args.ks or ("8,32" if args.quick else "8,32,128")).split(",")]
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    rows = 800 if args.quick else None
    root = data_root() / "amazon_multidomain"
    files = {d: {"train": str(root / f"{d}.train.jsonl"), "test": str(root / f"{d}.test.jsonl")} for d in DOMAINS}
    results: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        registry = Registry(work / "registry")
        own = {}
        for domain in DOMAINS:  # each domain's own adapter: a merge ingredient, and the in-domain reference
            if not registry.list(name=f"own-{domain}"):
                result = train_domain(parse_recipe(recipe("own", {domain: files[domain]}, rows, epochs=2)), domain,
                                      work / "own", progress_label=f"own/{domain}")
                registry.add(result.out_dir)
            own[domain] = registry.get(f"own-{domain}").metrics.get("test", {}).get("accuracy")
        for held in args.folds.split(","):
            sources = [d for d in DOMAINS if d != held]
            started = time.perf_counter()
            if not registry.list(name=f"meta{held}-meta"):
                meta_train(parse_recipe(recipe(f"meta{held}", {d: {"train": files[d]["train"]} for d in sources}, rows)),
                           work / f"meta-{held}", MetaSettings(args.meta_steps, args.inner_steps), registry)
            if not registry.list(name=f"pooled{held}-pooled"):
                pooled = work / f"pooled-{held}.jsonl"
                with open(pooled, "w", encoding="utf-8") as out:
                    for d in sources:
                        out.write(Path(files[d]["train"]).read_text(encoding="utf-8"))
                result = train_domain(parse_recipe(recipe(f"pooled{held}", {"pooled": {"train": str(pooled)}}, rows)),
                                      "pooled", work / f"pooled-{held}", progress_label=f"pooled/{held}")
                registry.add(result.out_dir)
            if not registry.list(name=f"merge-{held}"):
                combine_adapters(registry, [f"own-{d}" for d in sources], "linear", f"merge-{held}", rank=8)
            emit(fold=held, metric="initialisations_seconds", value=time.perf_counter() - started)
            starts = {"fresh": None, "meta": f"meta{held}-meta", "pooled": f"pooled{held}-pooled",
                      "merge": f"merge-{held}"}
            starts = {init: ref for init, ref in starts.items() if init in args.inits.split(",")}
            for k in ks:
                for seed in seeds:
                    for init, ref in starts.items():
                        few = recipe(f"few-{held}-{k}-{seed}-{init}", {held: files[held]}, None, shots=k, seed=seed,
                                     max_steps=args.steps, warmup_steps=0)
                        if ref:
                            few["init_from"] = ref
                        result = train_domain(parse_recipe(few), held, work / "few" / f"{held}-{k}-{seed}-{init}",
                                              registry=registry, progress_label=f"{held}/K={k}/{init}")
                        accuracy = result.metrics["test"]["accuracy"]
                        results.setdefault((k, init), []).append(accuracy)
                        emit(fold=held, k=k, seed=seed, init=init, accuracy=accuracy, steps=args.steps,
                             train_seconds=result.metrics["train_seconds"], in_domain=own[held],
                             source_rows=rows or "all")
        for (k, init), values in sorted(results.items()):
            emit(summary=True, k=k, init=init, mean=statistics.mean(values),
                 spread=statistics.pstdev(values) if len(values) > 1 else 0.0, runs=len(values),
                 folds=args.folds.split(","), source_rows=rows or "all", in_domain_mean=statistics.mean(
                     own[d] for d in args.folds.split(",") if own[d] is not None))


if __name__ == "__main__":
    main()
