"""`eval`, `generate`, `classify`, `tag` and `route`: run adapters on inputs."""

from __future__ import annotations

import itertools
import json
import sys

from ..errors import UserInputError
from ..formats import read_manifest
from ..registry.refs import Auto, Base, Stack, parse_ref, resolve
from .common import add_registry_arguments, chunks, iter_inputs, one_line, open_registry, predictions_file, read_inputs


def add_eval(sub) -> None:
    """`eval ADAPTER DATA`."""
    p = sub.add_parser("eval", help="evaluate an adapter (registry ref or folder) on a data file")
    p.add_argument("adapter", help="registry NAME[@VERSION|@TAG], or a folder written by `peft-adapt train` (a path: "
                                   "runs/x/books, ./books); with --base-only also a base model")
    p.add_argument("data", help="JSONL, CSV, Parquet or a saved datasets folder")
    p.add_argument("--base-only", action="store_true",
                   help="score the adapter's base (or the named base model) without any adapter: causal LM perplexity")
    p.add_argument("--max-length", type=int, default=256, help="with --base-only on a base model: tokens per example")
    p.add_argument("--out", help="write one JSON line per example (prediction, gold, probabilities or loss)")
    add_registry_arguments(p)
    p.add_argument("--quantization", choices=["none", "int8", "nf4", "fp4"], help="load the base this way instead")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-rows", type=int, help="evaluate only the first N rows")
    p.add_argument("--force", action="store_true", help="load even if the base fingerprint differs")
    p.set_defaults(func=_cmd_eval)


def _add_texts(p, command: str) -> None:
    """The inputs and output options every text verb shares."""
    p.add_argument("prompts", nargs="*", help="texts (or use --file)")
    p.add_argument("--file", help="a text file with one text per line (lines end at \\n only"
                   + (", write \\\\n for a newline inside a prompt" if command == "generate" else "")
                   + "), or a JSONL / CSV / Parquet file or datasets folder (see --text-field)")
    p.add_argument("--text-field", default="text", help="the field that holds the text in a data file (default: text)")
    p.add_argument("--out", help="write predictions as JSONL to this file, one per input with its id")
    p.add_argument("--batch-size", type=int, default=32, help="inputs run together (default 32)")


def _add_base(p) -> None:
    p.add_argument("--quantization", choices=["none", "int8", "nf4", "fp4"])
    p.add_argument("--device", default="auto")
    add_registry_arguments(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def _add_adapter_choice(p) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--adapter", help="one adapter for every text: registry NAME[@VERSION|@TAG] or a folder; "
                                         "auto (or auto:TAG) routes each text to its domain's adapter")
    group.add_argument("--adapters", help="comma-separated, one per text (base for none)")
    group.add_argument("--mix", help="one linear mix of adapters for every text, e.g. --mix books=0.5,dvd=0.5 "
                                     "(LoRA; classifiers need one label map)")
    p.add_argument("--base", help="base model (default: the one the first adapter was trained on)")
    _add_base(p)


def add_generate(sub) -> None:
    """`generate PROMPT ...`: continue prompts with one adapter, or one adapter per prompt."""
    p = sub.add_parser("generate", help="continue prompts with one adapter, or one adapter per prompt")
    _add_texts(p, "generate")
    _add_adapter_choice(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_cmd_generate)


def add_classify(sub) -> None:
    """`classify TEXT ...`: label texts with a classification adapter (or one per text)."""
    p = sub.add_parser("classify", help="label texts with a classification adapter (or one per text)")
    _add_texts(p, "classify")
    _add_adapter_choice(p)
    p.set_defaults(func=_cmd_classify)


def add_tag(sub) -> None:
    """`tag TEXT ...`: a tag per word from a token-classification adapter (or one per text)."""
    p = sub.add_parser("tag", help="tag each word with a token-classification adapter (NER; a CRF decodes by Viterbi)")
    _add_texts(p, "tag")
    p.set_defaults(func=_cmd_tag)
    _add_adapter_choice(p)


def add_route(sub) -> None:
    """`route TEXT ...`: which adapter each text would be routed to."""
    p = sub.add_parser("route", help="which adapter each text would be routed to, with its confidence")
    _add_texts(p, "route")
    p.add_argument("--router", default="auto", help="auto (every signed adapter of the base and task), "
                                                  "auto:TAG, or auto:NAME,NAME,...")
    p.add_argument("--task", default="causal_lm", choices=["causal_lm", "classification"])
    p.add_argument("--threshold", type=float, default=0.5, help="below this confidence: a mix (or --fallback)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--fallback", choices=["mix", "base", "nearest"])
    p.add_argument("--base", help="base model (default: the base of the registry's adapters of --task)")
    _add_base(p)
    p.set_defaults(func=_cmd_route, adapter=None, adapters=None, mix=None)


def _cmd_eval(args) -> int:
    from ..training.evaluation import evaluate_base_model, evaluate_file  # lazy: the CLI starts without torch

    records: list | None = [] if args.out else None
    try:
        folder, source = open_registry(args).locate(args.adapter)
    except UserInputError:
        if not args.base_only:
            raise
        folder, source = None, args.adapter  # --base-only on a model name rather than an adapter
    if args.base_only and folder is not None and not (folder / "manifest.json").is_file():
        folder = None  # a model folder, not an adapter
    if folder is None:
        metrics = evaluate_base_model(args.adapter, args.data, quantization=args.quantization or "nf4",
                                      device=args.device, batch_size=args.batch_size, max_rows=args.max_rows,
                                      max_length=args.max_length, records=records)
    else:
        metrics = evaluate_file(folder, args.data, quantization=args.quantization, device=args.device,
                                batch_size=args.batch_size, max_rows=args.max_rows, force=args.force,
                                base_only=args.base_only, records=records, source=source,
                                registry=open_registry(args))
    subject = {"base_of" if folder is not None and args.base_only else "base" if folder is None else "adapter": source}
    print(json.dumps(subject | {"data": str(args.data), **metrics}))
    if args.out:
        with predictions_file(args) as out:
            for record in records:
                out.write(json.dumps(record) + "\n")
        print(f"wrote {len(records)} per-example predictions to {args.out}", file=sys.stderr)
    return 0


def _runtime_for(args, task: str):
    """A runtime on --base, or on the base (and quantization) the first named adapter was trained on."""
    from ..runtime import AdapterRuntime  # lazy: the CLI starts without torch

    registry = open_registry(args)
    named = [ref for ref in map(parse_ref, _adapter_names(args)) if not isinstance(ref, Base)]
    base, quantization = args.base, args.quantization
    if base is None and (not named or isinstance(named[0], Auto)) and (named or args.command == "route"):
        entries = registry.list()
        bases = {(e.base_model, e.quantization) for e in entries if e.task == task}
        if not bases:
            others = sorted({e.task for e in entries if e.task in ("causal_lm", "classification")})
            fix = f"add --task {others[0]}" if others else "register (or train) adapters first"
            raise UserInputError(f"the registry holds no {task} adapters"
                                 + (f" (it holds {', '.join(others)} ones)" if others else "") + f": {fix}")
        if len(bases) > 1:
            raise UserInputError(f"the registry holds {task} adapters of {len(bases)} bases "
                                 f"({', '.join(sorted(b for b, _ in bases))}): give --base MODEL")
        (base, trained_under), = bases
        quantization = quantization or trained_under
    if base is None:
        if not named:
            raise UserInputError("give --base MODEL, or an adapter whose base the registry knows")
        folder = resolve(named[0].parts[-1] if isinstance(named[0], Stack) else named[0], registry).folder  # a stack: its top
        manifest = read_manifest(folder)
        base, quantization = manifest.base_model, quantization or manifest.quantization
        if task == "causal_lm" and manifest.task == "seq2seq":  # `generate` writes with an encoder-decoder too
            task = "seq2seq"
    return AdapterRuntime(base, task=task, quantization=quantization or "nf4", registry=registry, device=args.device)


MIX_NAME = "mix"


def _mix_weights(args) -> dict[str, float] | None:
    """--mix A=0.5,B=0.5: adapters and their weights, loaded as one linear mix."""
    if not args.mix:
        return None
    weights = {}
    for item in args.mix.split(","):
        ref, _, value = item.partition("=")
        try:
            weights[ref.strip()] = float(value)
        except ValueError:
            raise UserInputError(f"--mix {item!r}: expected NAME=WEIGHT, e.g. --mix books=0.5,dvd=0.5") from None
    return weights


def _per_prompt(names: list[str], prompts: list[str], args) -> list[str | None]:
    if args.mix:
        return [MIX_NAME] * len(prompts)
    if args.adapters:
        if len(names) != len(prompts):
            raise UserInputError(f"--adapters names {len(names)} adapters for {len(prompts)} prompts; give one per prompt")
        return [None if isinstance(parse_ref(n), Base) else n for n in names]
    return [names[0] if names else None] * len(prompts)


def _adapter_names(args) -> list[str]:
    if args.mix:
        return list(_mix_weights(args))
    return args.adapters.split(",") if args.adapters else [args.adapter] if args.adapter else []


def _runtime_with_mix(args, task: str):
    runtime = _runtime_for(args, task)
    if args.mix:
        runtime.load(MIX_NAME, weights=_mix_weights(args))
    return runtime


def _routed(runtime, prompts: list[str], names: list) -> list:
    """Each `auto` row replaced by the adapter (or mix, or base) the router chose, so the output can name it."""
    names = list(names)
    for selector in {n for n in names if n is not None and isinstance(parse_ref(n), Auto)}:
        rows = [i for i, n in enumerate(names) if n == selector]
        for i, route in zip(rows, runtime.route([prompts[i] for i in rows], selector)):
            names[i] = route.serve_as
    return names


def _cmd_generate(args) -> int:
    items = read_inputs(args, unescape=True)
    prompts = [text for _, text in items]
    per_prompt = _per_prompt(_adapter_names(args), prompts, args)  # bad counts fail before the model loads
    runtime = _runtime_with_mix(args, "causal_lm")
    with predictions_file(args) as out:
        for start in range(0, len(items), args.batch_size):
            chunk = slice(start, start + args.batch_size)
            per_prompt[chunk] = _routed(runtime, prompts[chunk], per_prompt[chunk])
            outputs = runtime.generate(prompts[chunk], per_prompt[chunk], max_new_tokens=args.max_new_tokens,
                                       do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
            for (item_id, prompt), adapter, text in zip(items[chunk], per_prompt[chunk], outputs):
                record = {"id": item_id, "adapter": adapter, "completion": text}
                if out is not None:
                    out.write(json.dumps(record) + "\n")
                elif args.json:
                    print(json.dumps(record | {"prompt": prompt}), flush=True)
                else:  # a causal LM continues its prompt; an encoder-decoder writes a text of its own
                    shown = f"{prompt} -> {text}" if runtime.task == "seq2seq" else f"{prompt}{text}"
                    print(f"[{adapter or 'base'}] {shown}", flush=True)
    return 0


def _cmd_route(args) -> int:
    items = read_inputs(args)
    runtime = _runtime_for(args, args.task)
    chosen_from = runtime.router(args.router).names
    print(f"routing among {len(chosen_from)} adapters ({args.router}): {', '.join(chosen_from)}", file=sys.stderr)
    for start in range(0, len(items), args.batch_size):
        chunk = items[start : start + args.batch_size]
        routes = runtime.route([text for _, text in chunk], args.router, args.threshold, args.top_k, args.fallback)
        for (item_id, text), route in zip(chunk, routes):
            if args.json:
                print(json.dumps({"id": item_id, **route.as_dict(), "serve_as": route.serve_as}), flush=True)
            else:
                chosen = route.serve_as or "base"
                print(f"{item_id}\t{chosen}\t{route.confidence:.3f}{'  (far: base)' if route.far else ''}\t"
                      f"{one_line(text)}", flush=True)
    return 0


def _cmd_classify(args) -> int:
    items = chunks(iter_inputs(args), args.batch_size)  # the file is read as predictions are made
    first = next(items)  # a bad file or argument fails here, before the model loads
    one_each = bool(args.adapters)
    if one_each:  # --adapters names one adapter per argument text: they are few, and all in hand
        first += [item for chunk in items for item in chunk]
        per_text = _per_prompt(_adapter_names(args), [text for _, text in first], args)
        items = iter([])
    runtime = _runtime_with_mix(args, "classification")
    count = 0
    with predictions_file(args) as out:
        # a chunk at a time, printed as it is done: a file of any size never goes through as one batch
        for chunk in itertools.chain([first], items):
            texts = [text for _, text in chunk]
            names = per_text[count : count + len(chunk)] if one_each else _per_prompt(_adapter_names(args), texts, args)
            for (item_id, text), result in zip(chunk, runtime.classify(texts, names, args.batch_size)):
                record = {"id": item_id, "adapter": result["adapter"], "label": result["label"],
                          "label_id": result["label_id"], "probs": result["probs"]}
                if "route" in result:  # routed: how sure the router was
                    record["route_confidence"] = result["route"]["confidence"]
                if out is not None:
                    out.write(json.dumps(record) + "\n")
                elif args.json:
                    print(json.dumps(record | {"text": text}), flush=True)
                else:
                    print(f"{item_id}\t{result['label']}\t{max(result['probs'].values()):.3f}\t[{result['adapter']}] "
                          f"{one_line(text)}", flush=True)
            count += len(chunk)
    if out is not None:
        print(f"wrote {count} predictions to {args.out}")
    return 0


def _cmd_tag(args) -> int:
    """Texts are split on whitespace; a data file's --text-field may hold a list of words instead (CoNLL's tokens)."""
    items = list(iter_inputs(args, words=True))
    names = _per_prompt(_adapter_names(args), [text for _, text in items], args)  # bad counts fail before loading
    if any(n is None for n in names):
        raise UserInputError("tagging needs a token-classification adapter for every text: give --adapter NAME")
    runtime = _runtime_with_mix(args, "classification")
    count = 0
    with predictions_file(args) as out:
        for chunk in chunks(list(zip(items, names)), args.batch_size):
            results = runtime.tag([text for (_, text), _ in chunk], [name for _, name in chunk], args.batch_size)
            for ((item_id, _), _), result in zip(chunk, results):
                record = {"id": item_id} | {k: result[k] for k in ("adapter", "words", "tags", "entities", "untagged")}
                if out is not None:
                    out.write(json.dumps(record) + "\n")
                elif args.json:
                    print(json.dumps(record), flush=True)
                else:  # Stanford NER's inline style: word/TAG for every word not tagged O
                    shown = [w if t == "O" else f"{w}/{t}" for w, t in zip(result["words"], result["tags"])]
                    print(f"{item_id}\t[{result['adapter']}] {one_line(' '.join(shown), 200)}", flush=True)
            count += len(chunk)
    if out is not None:
        print(f"wrote {count} predictions to {args.out}")
    return 0
