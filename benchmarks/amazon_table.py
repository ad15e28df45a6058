"""The tables of `amazon_cross_domain.py`, pooled from the JSON lines of several runs (issue 33).

A full measurement (12 pairs x 2 sizes x 3 seeds) does not fit one process on a CPU: it is split by pairs, seeds
and sizes across processes and days. This reads their logs (stdout or `amazon_cross_domain.jsonl`), groups the
safeguard lines by data size, and prints per size: the mean over seeds per pair and method, with and without the
safeguard; per method its mean, the share of the transfer gap closed (against in-domain on the same pairs), the
worst pair and the pairs more than 0.5 below source-only (the issue's bar, on the mean over seeds); how often the
safeguard's choice agrees with the target-label oracle; and how often each criterion alone would have.

    python benchmarks/amazon_table.py run-a.log run-b.log --runs out-a/ --runs out-b/
    python benchmarks/amazon_table.py old.log --rows 400      # a log from before the lines carried their size
    python benchmarks/amazon_table.py old.log --rechoose      # its criteria judged by the rule now in the code

In-domain accuracy (the upper bound) comes from `amazon_cross_domain_in_domain` lines, or, for logs written before
those existed, from the source-only adapters' `metrics.json` under each `--runs` folder (the benchmark's `--out`);
the mean over seeds.
The last line is one JSON object with every figure printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

PREFIX = '{"name": "'
CHOICES = ("amazon_cross_domain_safeguard", "safeguard_replay")  # the benchmark's, and safeguard_replay.py's
BAR = 0.005  # the bar: with the safeguard, no pair more than 0.5 point below source-only


def votes(criteria: dict) -> dict[str, str]:
    """What each criterion alone would choose (adapted or source_only), as `adaptation.selection` reads them."""
    a, s = criteria["adapted"], criteria["source_only"]
    better = {"dev_risk": a["dev_risk"] < s["dev_risk"], "snd": a["snd"] > s["snd"],
              "source_accuracy": a["source_accuracy"] >= s["source_accuracy"],
              "target_entropy": a["target_entropy"] < s["target_entropy"]}
    if "prior_gap" in a and "prior_gap" in s:  # older lines lack it
        better["prior_gap"] = a["prior_gap"] <= s["prior_gap"]
    for k in ("dev_error", "dev_base", "dev_error_base"):  # DEV variants (older lines lack them)
        if k in a and k in s:
            better[k] = a[k] < s[k]
    if "reverse_accuracy" in a and "reverse_accuracy" in s:
        better["reverse_accuracy"] = a["reverse_accuracy"] >= s["reverse_accuracy"]
    return {k: "adapted" if v else "source_only" for k, v in better.items()}


def rechoose(choices: list[dict]) -> list[dict]:
    """Each line with the choice the rule now in the code (`adaptation.selection.choose`) makes from its logged
    criteria, in place of the one it records: runs logged under an earlier rule, judged by the current one."""
    from peft_adapt.adaptation.selection import choose  # lazy: the table alone needs no torch

    out = []
    for line in choices:
        selected, why = choose(line["criteria"]["adapted"], line["criteria"]["source_only"])
        out.append(line | {"selected": selected, "why": why, "agrees": line["oracle"] in ("either", selected)})
    return out


def read_lines(paths: list[Path], default_rows: int | None) -> tuple[list[dict], dict]:
    """The safeguard lines (each with its data size) and the in-domain accuracies {(rows, domain): {seed: acc}}.
    One line per (size, pair, method, seed), the last read: a run started again into the same --out appends the
    lines it had already written, and would otherwise count twice. Where the replaced line differs (the same seed
    run on another machine, or under other code) a note on stderr says so: pool such logs in separate tables."""
    choices, in_domain = {}, defaultdict(dict)
    for path in paths:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith(PREFIX)]
        # an older log's safeguard lines lack the size; its accuracy lines (one per pair) carry --rows when given
        sizes = {line["rows"] for line in lines if line.get("rows")}
        for line in lines:
            if line["name"] == "amazon_cross_domain_in_domain":
                in_domain[(line["rows"], line["domain"])][line.get("seed", 0)] = line["accuracy"]
            elif line["name"] in CHOICES:
                rows = line.get("rows") or (next(iter(sizes)) if len(sizes) == 1 else default_rows)
                if rows is None:
                    raise SystemExit(f"{path}: its lines do not say their data size; pass --rows N (the --rows the "
                                     "run was given)")
                key = (line["name"], rows, line["pair"], line["method"], line.get("seed"))
                earlier = choices.pop(key, None)  # the last line read keeps its place at the end
                if earlier is not None and earlier != line | {"rows": rows}:
                    print(f"note: {path} runs {line['method']} on {line['pair']} at {rows} rows, seed "
                          f"{line.get('seed')} again with other results; the last read is counted", file=sys.stderr)
                choices[key] = line | {"rows": rows}
    return list(choices.values()), in_domain


def in_domain_from_runs(folders: list[Path], in_domain: dict) -> None:
    """Source-only adapters scored on their own domain, as the benchmark saves them: runs/source_only[-seed]/<domain>
    (no suffix: seed 0). Fills only the (size, domain, seed) no log line gave: one figure per seed."""
    for folder in folders:
        folder = folder / "runs" if (folder / "runs").is_dir() else folder  # the --out folder, or its runs/
        for metrics in sorted(folder.glob("source_only*/*/metrics.json")):
            data = json.loads(metrics.read_text())
            name = metrics.parent.parent.name
            seed = int(name.rpartition("-")[2]) if "-" in name else 0
            in_domain[(data["rows"]["train"], metrics.parent.name)].setdefault(seed, data["test"]["accuracy"])


def summarise(choices: list[dict], in_domain: dict) -> dict:
    """Per size: the pair table (means over seeds) and per-method figures."""
    report = {}
    for rows in sorted({c["rows"] for c in choices}):
        at = [c for c in choices if c["rows"] == rows]
        cells = defaultdict(list)  # (pair, column) -> accuracies over seeds
        plain = {}  # (pair, seed) -> source-only accuracy
        seeds_of = defaultdict(list)  # (pair, method) -> the seeds it ran
        for c in at:
            guarded = c["adapted_accuracy"] if c["selected"] == "adapted" else c["source_only_accuracy"]
            cells[(c["pair"], c["method"])].append(c["adapted_accuracy"])
            cells[(c["pair"], c["method"] + "+safeguard")].append(guarded)
            plain[(c["pair"], c["seed"])] = c["source_only_accuracy"]
            seeds_of[(c["pair"], c["method"])].append(c["seed"])
        for (pair, _), accuracy in plain.items():
            cells[(pair, "source_only")].append(accuracy)
        mean = {key: statistics.fmean(v) for key, v in cells.items()}
        spread = {key: max(v) - min(v) for key, v in cells.items()}
        methods = sorted({c["method"] for c in at})
        domain = {d: statistics.fmean(v.values()) for (r, d), v in in_domain.items() if r == rows}  # over seeds
        per_method = {}
        for column in [m + suffix for m in methods for suffix in ("", "+safeguard")]:
            pairs = sorted(p for p, col in mean if col == column)
            method = column.removesuffix("+safeguard")
            # source-only on the seeds this method ran (a method cut short is not held against other seeds' runs)
            baseline = {p: statistics.fmean(plain[(p, seed)] for seed in seeds_of[(p, method)]) for p in pairs}
            gains = {p: mean[(p, column)] - baseline[p] for p in pairs}
            bound = [domain.get(p.split("->")[1]) for p in pairs]
            gap = statistics.fmean(bound) - statistics.fmean(baseline.values()) if None not in bound else None
            worst = min(gains, key=gains.get)
            runs = [c for c in at if c["method"] == method]
            per_method[column] = {
                "pairs": len(pairs), "seeds": sorted({c["seed"] for c in runs}),
                "mean": statistics.fmean(mean[(p, column)] for p in pairs),
                "source_only": statistics.fmean(baseline.values()),
                "gain": statistics.fmean(gains.values()),
                "gap_closed": statistics.fmean(gains.values()) / gap if gap and gap > 0 else None,
                "worst_pair": worst, "worst_gain": gains[worst],
                "below_bar": sorted(p for p, g in gains.items() if g < -BAR - 1e-9),  # -0.5 itself is within
                "largest_spread": max(spread[(p, column)] for p in pairs)}
            if column.endswith("+safeguard"):
                agree = lambda vote: sum(c["oracle"] in ("either", vote(c)) for c in runs)  # noqa: E731
                per_method[column]["agrees"] = agree(lambda c: c["selected"])
                per_method[column]["runs"] = len(runs)
                read_by_all = set.intersection(*(set(votes(c["criteria"])) for c in runs))  # older lines lack some
                per_method[column]["criteria_agree"] = {
                    k: agree(lambda c, k=k: votes(c["criteria"])[k]) for k in sorted(read_by_all)}
        report[rows] = {"pairs": sorted({p for p, _ in mean}), "methods": methods, "mean": mean, "spread": spread,
                        "in_domain": domain, "per_method": per_method}
    return report


def show(report: dict) -> None:
    pct = lambda x: "" if x is None else f"{100 * x:.2f}"  # noqa: E731
    for rows, r in report.items():
        columns = ["source_only"] + [m + s for m in r["methods"] for s in ("", "+safeguard")]
        print(f"\n## {rows} rows\n\n| pair | {' | '.join(columns)} | in_domain |")
        print("|---" * (len(columns) + 2) + "|")
        for pair in r["pairs"]:
            cells = []
            for col in columns:
                value, spread = r["mean"].get((pair, col)), r["spread"].get((pair, col), 0.0)
                cells.append(pct(value) + (f" ±{100 * spread / 2:.2f}" if value is not None and spread else ""))
            print(f"| {pair} | {' | '.join(cells)} | {pct(r['in_domain'].get(pair.split('->')[1]))} |")
        print()
        for col, m in r["per_method"].items():
            gap = f"{100 * m['gap_closed']:.0f}% of the gap" if m["gap_closed"] is not None else "gap unknown"
            line = (f"{col}: {pct(m['mean'])} against source-only {pct(m['source_only'])} on {m['pairs']} pairs, "
                    f"seeds {m['seeds']} ({100 * m['gain']:+.2f}, {gap}); worst {m['worst_pair']} "
                    f"{100 * m['worst_gain']:+.2f}; below source-only by more than 0.5: {len(m['below_bar'])}")
            if "agrees" in m:
                alone = ", ".join(f"{k} {v}" for k, v in m["criteria_agree"].items())
                line += f"; agrees with the oracle on {m['agrees']} of {m['runs']} runs (each criterion alone: {alone})"
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path, help="stdout logs or .jsonl files of amazon_cross_domain.py")
    parser.add_argument("--runs", action="append", type=Path, default=[],
                        help="a run's --out folder: in-domain accuracy from its source-only metrics.json")
    parser.add_argument("--rows", type=int, help="the data size of logs whose lines do not carry one")
    parser.add_argument("--rechoose", action="store_true",
                        help="judge each line's logged criteria by the rule now in the code, not the choice it records")
    args = parser.parse_args()
    choices, in_domain = read_lines(args.logs, args.rows)
    if not choices:
        raise SystemExit(f"no amazon_cross_domain_safeguard line in {', '.join(map(str, args.logs))}")
    if args.rechoose:
        choices = rechoose(choices)
    if args.runs:
        in_domain_from_runs(args.runs, in_domain)
    report = summarise(choices, in_domain)
    show(report)
    print(json.dumps({"name": "amazon_cross_domain_summary", "sizes": {
        rows: {"per_method": r["per_method"], "in_domain": r["in_domain"],
               "mean": {f"{p}|{c}": v for (p, c), v in r["mean"].items()}} for rows, r in report.items()}}))


if __name__ == "__main__":
    main()
