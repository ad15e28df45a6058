"""Automatic routing (`model: auto`): ours beside peft's Arrow, the oracle (the true domain's adapter) and the base.

Three sets of domains, one LoRA adapter trained per domain (signed at training: routing.py), held-out text routed:
- `quickstart`: code / docs / news, the quickstart's own corpora, on smollm2-135m (nf4), causal LM;
- `domain_text`: medical / legal / news / code from ../shared/data, on smollm2-135m (nf4), causal LM;
- `amazon`: books / dvd / electronics / kitchen reviews, on minilm-l6 (nf4), sentiment classifiers (the hard case:
  product categories overlap).
For each set it prints JSON lines of:
- routing accuracy on held-out rows (read up to 256 tokens, `rows`) and on their first 32 tokens (`prompts`), ours
  and Arrow's (Arrow routes every token at every layer: its choice for a row is the adapter with the largest
  coefficient summed over the row's tokens and layers), with our mean confidence beside our accuracy;
- quality: causal LM, the perplexity of held-out rows under the base, the oracle, ours (`auto`) and Arrow; Amazon,
  accuracy of the oracle against ours (`auto`). Arrow is not run on Amazon: it mixes LoRA deltas inside the encoder
  but has no notion of the adapters' separate classifier heads;
- cost: a request's latency routed (`auto`) against the same request naming its adapter (one prompt, 16 new tokens;
  one text classified), batch throughput likewise (16 rows), and Arrow's forward time over the held-out rows
  against ours (`auto`), all in this one process, interleaved, medians.

    python benchmarks/routing.py --quick                 # CPU: small adapters, 100 held-out rows a domain
    python benchmarks/routing.py --sets amazon --quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mixed_batch import _interleaved  # noqa: E402  (benchmarks/ is on the path when a script runs)

PROMPT_TOKENS = 32
SETS = ("quickstart", "domain_text", "amazon")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _split(texts: list[str], held: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts = list(texts)
    rng.shuffle(texts)
    cut = max(len(texts) - held, int(len(texts) * 0.8))
    return texts[:cut], texts[cut:][:held]


def quickstart_domains(held: int) -> dict[str, tuple[list[str], list[str]]]:
    from peft_adapt.cli.quickstart import _pieces
    from peft_adapt.data.corpora import CORPORA, documents, is_held_out

    out = {}
    for corpus in CORPORA:
        train, heldout = [], []
        for doc_id, text in documents(corpus):
            (heldout if is_held_out(doc_id) else train).extend(_pieces(text))
        random.Random(0).shuffle(heldout)
        out[corpus] = (train, heldout[:held])
    return out


def domain_text_domains(root: Path, held: int) -> dict[str, tuple[list[str], list[str]]]:
    from peft_adapt.cli.quickstart import _pieces

    out = {}
    for domain in ("medical", "legal", "news", "code"):
        texts = []
        for row in _jsonl(root / "domain_text" / f"{domain}.jsonl"):
            text = row.get("text") or row.get("source") or ""
            texts += _pieces(text) if len(text) > 1500 else [text]
        out[domain] = _split([t for t in texts if t.strip()], held)
    return out


def amazon_domains(root: Path, held: int) -> dict[str, tuple[list[dict], list[dict]]]:
    out = {}
    for domain in ("books", "dvd", "electronics", "kitchen"):
        test = _jsonl(root / "amazon_multidomain" / f"{domain}.test.jsonl")
        random.Random(0).shuffle(test)
        out[domain] = (_jsonl(root / "amazon_multidomain" / f"{domain}.train.jsonl"), test[:held])
    return out


def train_adapters(set_name: str, domains: dict, work: Path, registry, quick: bool) -> dict[str, str]:
    """One adapter per domain, registered (and signed, as training signs every adapter); returns domain -> name."""
    from peft_adapt import parse_recipe, train_domain

    names = {}
    for domain, (train, _) in domains.items():
        data = work / f"{set_name}-{domain}.jsonl"
        with open(data, "w", encoding="utf-8") as f:
            for row in train:
                f.write(json.dumps(row if isinstance(row, dict) else {"text": row}) + "\n")
        if set_name == "amazon":
            recipe = {
                "name": set_name, "base": {"model": "minilm-l6", "quantization": "nf4"},
                "task": {"type": "classification", "max_length": 96},
                "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
                "training": {"epochs": 2, "batch_size": 16, "learning_rate": 1e-3, "seed": 0,
                             "max_train_rows": 800 if quick else None, "max_eval_rows": 100},
                "domains": {domain: {"train": str(data)}},
            }
        else:
            recipe = {
                "name": set_name, "base": {"model": "smollm2-135m", "quantization": "nf4"},
                "task": {"type": "causal_lm", "max_length": 128, "packing": True},
                "adapter": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
                "training": {"max_steps": 20 if quick else 200, "batch_size": 4, "learning_rate": 1e-3, "seed": 0,
                             "scheduler": "constant_with_warmup", "warmup_steps": 2,
                             "max_train_rows": 2000, "max_eval_rows": 16},
                "domains": {domain: {"train": str(data)}},
            }
        result = train_domain(parse_recipe(recipe, work / f"{set_name}.yaml"), domain, work / "adapters",
                              progress_label=f"{set_name}/{domain}")
        names[domain] = registry.add(result.out_dir).name
        del result
    return names


def _row_nll(logits, ids) -> tuple[float, int]:
    import torch

    logp = torch.log_softmax(logits[:-1].float(), -1)
    return float(-logp.gather(-1, ids[1:].unsqueeze(-1)).sum()), len(ids) - 1


class ArrowBaseline:
    """peft's Arrow over the same adapter folders, on its own copy of the base."""

    def __init__(self, base: str, folders: list[Path]):
        from peft import ArrowConfig, create_arrow_model

        from peft_adapt.models.backbone import load_backbone
        from peft_adapt.models.model_files import BaseSpec

        backbone = load_backbone(BaseSpec(model=base, quantization="nf4"), "causal_lm")
        self.model = create_arrow_model(backbone.model, [str(f) for f in folders],
                                        ArrowConfig(top_k=min(3, len(folders)))).eval()
        self.layers = [m for m in self.model.modules() if type(m).__name__ == "ArrowLoraLinearLayer"]
        self.scores = None
        for layer in self.layers:
            layer.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, _output):
        import torch

        if self.scores is None:
            return
        x = (args[0] if args else kwargs["x"]).reshape(-1, module.in_features).to(module.prototypes.dtype)
        similarity = (x @ module.prototypes.T).abs()
        top = similarity.topk(module.top_k, dim=1)
        scores = torch.full_like(similarity, float("-inf")).scatter(1, top.indices, top.values)
        self.scores += (scores / module.temperature).softmax(1).sum(0).float().cpu()

    def choose_and_score(self, ids) -> tuple[int, float, int]:
        """(the adapter index Arrow weighted most over the row, the row's NLL, its predicted tokens)."""
        import torch

        self.scores = torch.zeros(len(self.model.peft_config) - 1)  # the router is an adapter too
        with torch.no_grad():
            logits = self.model(input_ids=ids.unsqueeze(0)).logits[0]
        choice, self.scores = int(self.scores.argmax()), None
        nll, count = _row_nll(logits, ids)
        return choice, nll, count

    def forward(self, rows) -> None:
        import torch

        with torch.no_grad():
            for ids in rows:
                self.model(input_ids=ids.unsqueeze(0))


def emit(**fields) -> None:
    print(json.dumps({"benchmark": "routing", **fields}), flush=True)


def route_accuracy(runtime, texts: list[str], truth: list[str], names: dict) -> dict:
    routes = runtime.route(texts, fallback="nearest")
    correct = [r.nearest == names[d] for r, d in zip(routes, truth)]
    return {"accuracy": sum(correct) / len(correct),
            "mean_confidence": sum(r.confidence for r in routes) / len(routes),
            "far": sum(r.far for r in routes)}


def run_causal(set_name: str, domains: dict, names: dict, registry, arrow_too: bool, quality_rows: int) -> None:
    import torch

    from peft_adapt import AdapterRuntime
    from peft_adapt.routing.router import ROUTE_TOKENS

    runtime = AdapterRuntime("smollm2-135m", task="causal_lm", quantization="nf4", registry=registry)
    tok = runtime.tokenizer
    texts, truth = [], []
    for domain, (_, held) in domains.items():
        texts += held
        truth += [domain] * len(held)
    rows = [torch.tensor(ids) for ids in tok(texts, truncation=True, max_length=ROUTE_TOKENS)["input_ids"]]
    prompts = [tok.decode(r[:PROMPT_TOKENS]) for r in rows]
    ours_rows = route_accuracy(runtime, texts, truth, names)
    ours_prompts = route_accuracy(runtime, prompts, truth, names)
    # quality: perplexity of the first `quality_rows` held-out rows of each domain, per row with its own adapter (no
    # padding), summed over rows
    keep = [i for i, d in enumerate(truth) if truth[: i + 1].count(d) <= quality_rows]
    q_rows, q_truth = [rows[i] for i in keep], [truth[i] for i in keep]
    routes = runtime.route([r.tolist() for r in q_rows])
    totals = {k: [0.0, 0] for k in ("base", "oracle", "ours", "arrow")}
    for ids, route, domain in zip(q_rows, routes, q_truth):
        for key, adapter in (("base", None), ("oracle", names[domain]), ("ours", route.serve_as)):
            nll, count = _row_nll(runtime.logits([ids.tolist()], adapters=adapter)[0], ids)
            totals[key][0] += nll
            totals[key][1] += count
    arrow_choice = None
    if arrow_too:
        folders = [registry.get(names[d]).path for d in domains]
        arrow = ArrowBaseline("smollm2-135m", folders)
        order = list(domains)
        arrow_choice = []
        for ids in q_rows:
            choice, nll, count = arrow.choose_and_score(ids)
            arrow_choice.append(order[choice])
            totals["arrow"][0] += nll
            totals["arrow"][1] += count
        arrow_prompts = []
        for ids in q_rows:
            choice, _, _ = arrow.choose_and_score(ids[:PROMPT_TOKENS])
            arrow_prompts.append(order[choice])
    perplexity = {k: float(torch.tensor(n / max(c, 1)).exp()) for k, (n, c) in totals.items() if c}
    emit(set=set_name, metric="routing_accuracy", input="rows", ours=ours_rows["accuracy"],
         ours_mean_confidence=ours_rows["mean_confidence"], ours_far=ours_rows["far"],
         rows=len(texts), domains=list(domains))
    emit(set=set_name, metric="routing_accuracy", input=f"first {PROMPT_TOKENS} tokens", ours=ours_prompts["accuracy"],
         ours_mean_confidence=ours_prompts["mean_confidence"], ours_far=ours_prompts["far"])
    if arrow_choice is not None:  # Arrow routes inside the forward: measured on the quality rows only
        emit(set=set_name, metric="routing_accuracy", input="quality rows", rows=len(q_truth),
             ours=sum(r.nearest == names[t] for r, t in zip(routes, q_truth)) / len(q_truth),
             arrow=sum(a == t for a, t in zip(arrow_choice, q_truth)) / len(q_truth),
             arrow_first_32_tokens=sum(a == t for a, t in zip(arrow_prompts, q_truth)) / len(q_truth))
    emit(set=set_name, metric="perplexity", rows=len(q_truth), **perplexity,
         ours_vs_oracle=perplexity["ours"] / perplexity["oracle"] - 1,
         arrow_vs_oracle=perplexity["arrow"] / perplexity["oracle"] - 1 if "arrow" in perplexity else None)
    # cost: one request routed against the same request naming its adapter; a batch of 16 likewise
    prompt, adapter = prompts[0], names[truth[0]]
    batch = prompts[:: max(1, len(prompts) // 16)][:16]
    given = [names[t] for t in truth[:: max(1, len(prompts) // 16)][:16]]
    generate = dict(max_new_tokens=16)
    timings = _interleaved({
        "request_given": lambda: runtime.generate([prompt], adapter, **generate),
        "request_auto": lambda: runtime.generate([prompt], "auto", **generate),
        "batch_given": lambda: runtime.generate(batch, given, **generate),
        "batch_auto": lambda: runtime.generate(batch, "auto", **generate),
        "route_batch": lambda: runtime.route(batch),
    }, repeats=5)
    emit(set=set_name, metric="cost", unit="seconds (median of 5)", **timings,
         request_overhead=timings["request_auto"] / timings["request_given"] - 1,
         batch_overhead=timings["batch_auto"] / timings["batch_given"] - 1,
         threads=torch.get_num_threads())
    if arrow_too:
        sample = q_rows[:: max(1, len(q_rows) // 16)][:16]
        forward = _interleaved({
            "ours_auto": lambda: [runtime.logits([r.tolist()], adapters="auto") for r in sample],
            "arrow": lambda: arrow.forward(sample),
        }, repeats=3)
        emit(set=set_name, metric="forward_cost", unit="seconds for 16 rows one at a time (median of 3)", **forward,
             arrow_over_ours=forward["arrow"] / forward["ours_auto"])


def run_amazon(domains: dict, names: dict, registry) -> None:
    import torch

    from peft_adapt import AdapterRuntime

    runtime = AdapterRuntime("minilm-l6", task="classification", quantization="nf4", registry=registry)
    texts, truth, labels = [], [], []
    for domain, (_, held) in domains.items():
        texts += [r["text"] for r in held]
        truth += [domain] * len(held)
        labels += [r["label_name"] for r in held]  # the classifiers' label map names the classes
    tok = runtime.tokenizer
    prompts = [tok.decode(ids[1:PROMPT_TOKENS + 1]) for ids in tok(texts, truncation=True, max_length=64)["input_ids"]]
    ours_rows = route_accuracy(runtime, texts, truth, names)
    ours_prompts = route_accuracy(runtime, prompts, truth, names)
    oracle = runtime.classify(texts, [names[d] for d in truth])
    routed = runtime.classify(texts, "auto")

    def accuracy(results):
        return sum(r["label"] == y for r, y in zip(results, labels)) / len(labels)

    emit(set="amazon", metric="routing_accuracy", input="rows", ours=ours_rows["accuracy"],
         ours_mean_confidence=ours_rows["mean_confidence"], arrow=None, rows=len(texts), domains=list(domains))
    emit(set="amazon", metric="routing_accuracy", input=f"first {PROMPT_TOKENS} tokens", ours=ours_prompts["accuracy"],
         ours_mean_confidence=ours_prompts["mean_confidence"], arrow=None)
    emit(set="amazon", metric="classification_accuracy", oracle=accuracy(oracle), ours=accuracy(routed),
         ours_minus_oracle=accuracy(routed) - accuracy(oracle))
    batch, given = texts[::25][:16], [names[d] for d in truth[::25][:16]]
    timings = _interleaved({
        "request_given": lambda: runtime.classify(batch[:1], given[0]),
        "request_auto": lambda: runtime.classify(batch[:1], "auto"),
        "batch_given": lambda: runtime.classify(batch, given),
        "batch_auto": lambda: runtime.classify(batch, "auto"),
    }, repeats=7)
    emit(set="amazon", metric="cost", unit="seconds (median of 7)", **timings,
         request_overhead=timings["request_auto"] / timings["request_given"] - 1,
         batch_overhead=timings["batch_auto"] / timings["batch_given"] - 1, threads=torch.get_num_threads())


def main() -> None:
    from peft_adapt import Registry
    from peft_adapt.training.recipe import data_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small adapters (20 steps; Amazon 800 rows)")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--held-out", type=int, default=100, help="held-out rows a domain")
    parser.add_argument("--no-arrow", action="store_true")
    parser.add_argument("--quality-rows", type=int, default=30, help="held-out rows a domain scored for perplexity")
    parser.add_argument("--work", help="keep the adapters here (default: a temporary folder)")
    args = parser.parse_args()
    root = data_root()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        for set_name in args.sets.split(","):
            registry = Registry(work / f"registry-{set_name}")
            if set_name == "quickstart":
                domains = quickstart_domains(args.held_out)
            elif set_name == "domain_text":
                domains = domain_text_domains(root, args.held_out)
            elif set_name == "amazon":
                domains = amazon_domains(root, args.held_out)
            else:
                parser.error(f"--sets: {set_name!r} is not one of {', '.join(SETS)}")
            started = time.perf_counter()
            names = {e.domain: e.name for e in registry.list()} or train_adapters(set_name, domains, work, registry,
                                                                                 args.quick)
            emit(set=set_name, metric="train_seconds", value=time.perf_counter() - started)
            if set_name == "amazon":
                run_amazon(domains, names, registry)
            else:
                run_causal(set_name, domains, names, registry, not args.no_arrow, args.quality_rows)


if __name__ == "__main__":
    main()
