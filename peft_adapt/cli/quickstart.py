"""`peft-adapt quickstart`: the main job, fully offline, in a few minutes on a laptop CPU.

On `smollm2-135m` in nf4 it trains one LoRA adapter per built-in domain of real text (Python
source code, Python documentation, BBC news), then measures every model on every domain's held-out
text and prints a perplexity table (rows: held-out domain; columns: the base and each adapter),
saved to `report.json` with a heatmap PNG.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import yaml

from ..data import Example, tokenize_causal_lm
from ..data.corpora import CORPORA, documents, is_held_out
from ..formats import write_json
from ..models.backbone import resolve_model_path
from ..training.domain import train_domain
from ..training.evaluation import evaluate_causal_lm
from ..training.plots import plot_heatmap
from ..training.recipe import parse_recipe

PIECE_CHARS = 1500  # documents are cut into pieces this long so one huge file cannot fill a domain


def _pieces(text: str) -> list[str]:
    """Cut a document at blank lines into pieces of at most about PIECE_CHARS characters."""
    pieces, current = [], ""
    for paragraph in text.split("\n\n"):
        if current and len(current) + len(paragraph) > PIECE_CHARS:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
        while len(current) > PIECE_CHARS:
            pieces.append(current[:PIECE_CHARS])
            current = current[PIECE_CHARS:]
    if current.strip():
        pieces.append(current)
    return [p for p in pieces if p.strip()]


def _take_tokens(pieces: list[str], tokenizer, tokens_needed: int) -> list[str]:
    taken, count = [], 0
    for piece in pieces:
        taken.append(piece)
        count += len(tokenizer(piece)["input_ids"]) + 1
        if count >= tokens_needed:
            break
    return taken


def build_domain_files(corpus: str, tokenizer, data_dir: Path, train_tokens: int, eval_tokens: int, seed: int) -> dict:
    """Write `<corpus>.train.jsonl` and `<corpus>.heldout.jsonl` from disjoint documents."""
    train_pieces, held_pieces = [], []
    for doc_id, text in documents(corpus):
        (held_pieces if is_held_out(doc_id) else train_pieces).extend(_pieces(text))
    rng = random.Random(seed)
    rng.shuffle(train_pieces)
    rng.shuffle(held_pieces)
    files = {}
    for split, pieces, needed in (("train", train_pieces, train_tokens), ("heldout", held_pieces, eval_tokens)):
        path = data_dir / f"{corpus}.{split}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for piece in _take_tokens(pieces, tokenizer, needed):
                f.write(json.dumps({"text": piece, "domain": corpus}) + "\n")
        files[split] = path
    return files


def quickstart_recipe(model: str, quantization: str, domains: dict, steps: int, batch_size: int,
                      max_length: int, rank: int, learning_rate: float, seed: int) -> dict:
    return {
        "name": "quickstart",
        "base": {"model": model, "quantization": quantization},
        "task": {"type": "causal_lm", "max_length": max_length, "packing": True},
        "adapter": {"method": "lora", "r": rank, "alpha": 2 * rank, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {
            "max_steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
            "scheduler": "constant_with_warmup", "warmup_steps": min(2, steps - 1), "seed": seed,
            "logging_steps": max(1, steps // 10),
        },
        "domains": {name: {"train": str(f["train"]), "eval": str(f["heldout"])} for name, f in domains.items()},
    }


def run_quickstart(out: str | Path = "quickstart_out", domains: tuple[str, ...] = CORPORA, steps: int = 20,
                   batch_size: int = 4, max_length: int = 128, eval_blocks: int = 8, model: str = "smollm2-135m",
                   quantization: str = "nf4", rank: int = 16, learning_rate: float = 1e-3, seed: int = 0,
                   registry=None) -> dict:
    """Train, measure and report; with a `registry`, each adapter is registered as quickstart-<domain>, ready for
    `peft-adapt generate --adapter quickstart-code ...` and the server."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    out = Path(out).resolve()  # the recipe it writes names its data files by absolute path
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    files = {
        name: build_domain_files(name, tokenizer, data_dir, int(1.2 * steps * batch_size * max_length),
                                 eval_blocks * max_length, seed)
        for name in domains
    }
    recipe_dict = quickstart_recipe(model, quantization, files, steps, batch_size, max_length, rank, learning_rate, seed)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
    recipe = parse_recipe(recipe_dict, out / "recipe.yaml")

    held_out = {}
    for name in domains:
        texts = [json.loads(line)["text"] for line in open(files[name]["heldout"], encoding="utf-8")]
        blocks = tokenize_causal_lm([Example(i, text=t) for i, t in enumerate(texts)], tokenizer, max_length, packing=True)
        held_out[name] = blocks[:eval_blocks]

    perplexity: dict[str, dict[str, float]] = {name: {} for name in domains}
    train_seconds, registered = {}, {}
    for step, name in enumerate(domains, start=1):
        print(f"== quickstart: training the {name} adapter ({step}/{len(domains)}) ==", flush=True)
        result = train_domain(recipe, name, out / "adapters")
        train_seconds[name] = result.metrics["train_seconds"]
        if registry is not None:
            registered[name] = registry.add(result.out_dir).ref
        pad = result.backbone.tokenizer.pad_token_id
        if "base" not in perplexity[domains[0]]:
            # The base is the first adapter's model with the adapter switched off: no second load.
            with result.model.disable_adapter():
                for held in domains:
                    perplexity[held]["base"] = evaluate_causal_lm(result.model, held_out[held], pad)["perplexity"]
        for held in domains:
            perplexity[held][f"adapter:{name}"] = evaluate_causal_lm(result.model, held_out[held], pad)["perplexity"]
        del result

    columns = ["base"] + [f"adapter:{name}" for name in domains]
    report = {
        "model": model,
        "quantization": quantization,
        "settings": {"steps": steps, "batch_size": batch_size, "max_length": max_length, "rank": rank,
                     "learning_rate": learning_rate, "eval_tokens_per_domain": eval_blocks * max_length, "seed": seed},
        "columns": columns,
        "perplexity": perplexity,
        "own_domain_change": {
            name: perplexity[name][f"adapter:{name}"] / perplexity[name]["base"] - 1 for name in domains
        },
        "train_seconds": train_seconds,
        "registered": registered,
        "wall_seconds": time.perf_counter() - started,
    }
    write_json(out / "report.json", report)
    plot_heatmap(
        [[perplexity[held][c] for c in columns] for held in domains], [f"held-out {d}" for d in domains], columns,
        out / "perplexity_heatmap.png", f"Perplexity ({model}, {quantization}); lower is better",
    )
    return report


def format_report(report: dict) -> str:
    columns = report["columns"]
    width = max(12, *(len(c) + 2 for c in columns))
    lines = ["held-out".ljust(12) + "".join(c.rjust(width) for c in columns)]
    for held, row in report["perplexity"].items():
        lines.append(held.ljust(12) + "".join(f"{row[c]:.2f}".rjust(width) for c in columns))
    lines.append("")
    for name, change in report["own_domain_change"].items():
        verdict = "beats the base" if change < 0 else "does NOT beat the base"
        lines.append(f"adapter:{name} on its own domain: {change:+.1%} perplexity vs base ({verdict})")
    if report.get("registered"):
        lines.append("registered: " + ", ".join(report["registered"].values())
                     + "  (try: peft-adapt generate --adapter quickstart-code \"def fibonacci(n):\")")
    lines.append(f"wall time: {report['wall_seconds']:.0f} s")
    return "\n".join(lines)
