"""`peft-adapt`: a thin front end. It parses arguments, calls the library and prints; nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ..errors import UserInputError
from ..registry.refs import Base, parse_ref
from ..registry.store import Registry


def _cmd_train(args) -> int:
    from ..training.distributed import world
    from ..training.domain import train_recipe
    from ..training.recipe import load_recipe

    if args.threads is not None:
        args.set.append(f"training.threads={args.threads}")
    recipe = load_recipe(args.recipe, args.set)  # a bad recipe fails here, before any worker starts
    out = Path(args.out) if args.out else Path("runs") / (recipe.name or Path(args.recipe).stem)
    if args.num_processes > 1 and world().size == 1:
        return _launch_workers(args, out)
    registry = None if args.no_register else open_registry(args)
    train_recipe(recipe, out, args.domain, registry=registry, stack_registry=open_registry(args),
                 parallel_domains=args.parallel_domains,
                 resume=args.resume, report=lambda line: print(line, flush=True))
    return 0


def _cmd_meta_train(args) -> int:
    from ..training.domain import result_line
    from ..training.meta import MetaSettings, meta_train
    from ..training.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    out = Path(args.out) if args.out else Path("runs") / f"{recipe.name or Path(args.recipe).stem}-meta"
    settings = MetaSettings(args.meta_steps, args.inner_steps, args.meta_lr, args.inner_lr)
    result = meta_train(recipe, out, settings, None if args.no_register else open_registry(args))
    print(result_line(result), flush=True)
    return 0


def _launch_workers(args, out: Path) -> int:
    """Run this same command in N workers (accelerate on GPUs, torch.distributed.run on the CPU)."""
    import shutil
    import subprocess
    import uuid

    from ..training.distributed import failures, launch_command

    argv = [a for a in sys.argv[1:]]
    i = argv.index("--num-processes") if "--num-processes" in argv else None
    if i is not None:
        del argv[i : i + 2]
    else:
        argv = [a for a in argv if not a.startswith("--num-processes=")]
    shutil.rmtree(out / ".failures", ignore_errors=True)
    env = os.environ | {"PEFT_ADAPT_RUN_ID": uuid.uuid4().hex}
    code = subprocess.run(launch_command(args.num_processes, argv), env=env).returncode
    failed = failures(out)
    for f in failed:
        print(f"error: domain {f['domain']!r} failed on worker {f['worker']}: {f['type']}: {f['error']}", file=sys.stderr)
    shutil.rmtree(out / ".workers", ignore_errors=True)
    return 1 if failed or code != 0 else 0


def _print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _headline(metrics: dict) -> str:
    split = metrics.get("test") or metrics.get("eval") or {}
    for key in ("accuracy", "perplexity", "macro_f1", "loss"):
        if key in split:
            return f"{key}={split[key]:.4g}"
    return ""


def _cmd_registry(args) -> int:
    registry = open_registry(args)
    action = args.action
    if action == "list":
        entries = registry.list(domain=args.domain, method=args.method, base=args.base, tag=args.tag)
        if args.json:
            print(json.dumps([e.to_json() for e in entries], indent=None))
        elif not entries:
            print(f"no adapters in {registry.where}")
        else:
            _print_table(
                [{"name": e.name, "version": e.version, "domain": e.domain, "method": e.method,
                  "base": e.base_model, "quant": e.quantization, "metric": _headline(e.metrics),
                  "tags": ",".join(e.tags), "created": e.created} for e in entries],
                ["name", "version", "domain", "method", "base", "quant", "metric", "tags", "created"],
            )
    elif action == "show":
        entry = registry.get(args.ref)
        if args.json:
            print(json.dumps(entry.to_json() | {"manifest": entry.manifest.dump()}, indent=2))
        else:
            for key, value in entry.to_json().items():
                print(f"{key:12} {json.dumps(value) if isinstance(value, (dict, list)) else value}")
            if entry.manifest.stack_on:  # a task adapter trained on a domain adapter: served as DOMAIN+TASK
                print(f"{'stack_on':12} {entry.manifest.stack_on['ref']} (serve as "
                      f"{entry.manifest.stack_on['name']}+{entry.name})")
    elif action == "tag":
        print(f"{registry.tag(args.ref, args.tag).ref} tagged {args.tag}")
    elif action == "untag":
        registry.untag(args.name, args.tag)
        print(f"removed tag {args.tag} from {args.name}")
    elif action == "rm":
        if "@" not in args.ref and not args.all_versions:
            raise UserInputError(f"`registry rm {args.ref}` would remove every version; name one ({args.ref}@N) or pass --all-versions")
        for e in registry.remove(args.ref):
            print(f"removed {e.ref}")
    elif action == "add":
        entry = registry.add(args.folder, name=args.name, domain=args.domain, tags=args.tag or [], allow_pickle=args.allow_pickle)
        print(f"registered {entry.ref}")
    elif action == "import":
        entry = registry.import_peft(args.folder, base=args.base, name=args.name, domain=args.domain,
                                     tags=args.tag or [], allow_pickle=args.allow_pickle)
        print(f"imported {entry.ref} (base {entry.base_model}, fingerprint {entry.fingerprint})")
    elif action == "export":
        print(f"exported {args.ref} to {registry.export(args.ref, args.out)}")
    elif action == "verify":
        report = registry.verify()
        if args.json:
            print(json.dumps({"ok": report.ok, "checked": report.checked, "problems": report.problems, "orphans": report.orphans}))
        else:
            print(f"checked {report.checked} adapter versions: {'ok' if report.ok else f'{len(report.problems)} problem(s)'}")
            for p in report.problems:
                print(f"  problem: {p}")
            if report.orphans:
                print(f"  {len(report.orphans)} unreachable folder(s) left by interrupted writes (`registry gc` removes them)")
        return 0 if report.ok else 1
    elif action == "gc":
        for path in registry.collect_garbage(args.min_age):
            print(f"removed {path}")
    elif action == "sign":
        from ..routing.router import sign_registered

        entry = sign_registered(registry, args.ref, args.file, args.text_field, args.quantization, args.device)
        print(f"signed {entry.ref} from {args.file} (routing picks it from now on)")
    return 0


def _cmd_eval(args) -> int:
    from ..training.evaluation import evaluate_base_model, evaluate_file

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
        with _predictions_file(args) as out:
            for record in records:
                out.write(json.dumps(record) + "\n")
        print(f"wrote {len(records)} per-example predictions to {args.out}", file=sys.stderr)
    return 0


def _inputs(args, unescape: bool = False) -> list[tuple[int | str, str]]:
    """(id, text) pairs from the arguments (ids 1..N) and from --file: a data file's `--text-field` (ids: its `id`
    field or row numbers), or a text file with one text per line (ids: line numbers)."""
    from ..data import read_texts

    items: list[tuple[int | str, str]] = list(enumerate(args.prompts, start=1))
    if args.file:
        from_file = read_texts(args.file, args.text_field)
        if unescape:  # prompt files write a newline inside a prompt as \n
            from_file = [(i, text.replace("\\n", "\n")) for i, text in from_file]
        items += from_file
    if not items:
        raise UserInputError("no inputs: give texts as arguments or with --file")
    return items


def _runtime_for(args, task: str):
    """A runtime on --base, or on the base (and quantization) the first named adapter was trained on."""
    from ..registry.refs import Auto, Base, Stack, parse_ref, resolve
    from ..runtime import AdapterRuntime

    registry = open_registry(args)
    named = [ref for ref in map(parse_ref, _adapter_names(args)) if not isinstance(ref, Base)]
    base, quantization = args.base, args.quantization
    if base is None and (not named or isinstance(named[0], Auto)) and (named or args.command == "route"):
        bases = {(e.base_model, e.quantization) for e in registry.list() if e.task == task}
        if len(bases) != 1:
            raise UserInputError(f"the registry holds {task} adapters of {len(bases)} bases: give --base MODEL")
        (base, trained_under), = bases
        quantization = quantization or trained_under
    if base is None:
        if not named:
            raise UserInputError("give --base MODEL, or an adapter whose base the registry knows")
        folder = resolve(named[0].parts[-1] if isinstance(named[0], Stack) else named[0], registry).folder  # a stack: its top
        from ..formats import read_manifest

        manifest = read_manifest(folder)
        base, quantization = manifest.base_model, quantization or manifest.quantization
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
    from ..routing.router import is_auto

    names = list(names)
    for selector in {n for n in names if is_auto(n)}:
        rows = [i for i, n in enumerate(names) if n == selector]
        for i, route in zip(rows, runtime.route([prompts[i] for i in rows], selector)):
            names[i] = route.serve_as
    return names


def _cmd_generate(args) -> int:
    items = _inputs(args, unescape=True)
    prompts = [text for _, text in items]
    per_prompt = _per_prompt(_adapter_names(args), prompts, args)  # bad counts fail before the model loads
    runtime = _runtime_with_mix(args, "causal_lm")
    with _predictions_file(args) as out:
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
                else:
                    print(f"[{adapter or 'base'}] {prompt}{text}", flush=True)
    return 0


def _cmd_route(args) -> int:
    items = _inputs(args)
    runtime = _runtime_for(args, args.task)
    for start in range(0, len(items), args.batch_size):
        chunk = items[start : start + args.batch_size]
        routes = runtime.route([text for _, text in chunk], args.router, args.threshold, args.top_k, args.fallback)
        for (item_id, text), route in zip(chunk, routes):
            if args.json:
                print(json.dumps({"id": item_id, **route.as_dict(), "serve_as": route.serve_as}), flush=True)
            else:
                chosen = route.serve_as or "base"
                print(f"{item_id}\t{chosen}\t{route.confidence:.3f}{'  (far: base)' if route.far else ''}\t"
                      f"{_one_line(text)}", flush=True)
    return 0


def _cmd_classify(args) -> int:
    items = _inputs(args)
    texts = [text for _, text in items]
    per_text = _per_prompt(_adapter_names(args), texts, args)
    runtime = _runtime_with_mix(args, "classification")
    with _predictions_file(args) as out:
        # a chunk at a time, printed as it is done: a file of any size never goes through as one batch
        for start in range(0, len(items), args.batch_size):
            chunk = slice(start, start + args.batch_size)
            for (item_id, text), result in zip(items[chunk], runtime.classify(texts[chunk], per_text[chunk], args.batch_size)):
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
                          f"{_one_line(text)}", flush=True)
    if out is not None:
        print(f"wrote {len(items)} predictions to {args.out}")
    return 0


def _one_line(text: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _predictions_file(args):
    """--out: predictions as JSONL, one per input with its id; otherwise nothing (they are printed)."""
    from contextlib import nullcontext

    if not getattr(args, "out", None):
        return nullcontext(None)
    path = Path(args.out)
    if path.is_dir():
        raise UserInputError(f"--out {path} is a folder; name a file such as predictions.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w", encoding="utf-8")


def _cmd_merge(args) -> int:
    from ..merge import combine_adapters

    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    entry = combine_adapters(open_registry(args), args.adapters, args.method, args.name, weights=weights,
                             density=args.density, seed=args.seed, rank=args.rank)
    merge = entry.manifest.merge
    print(f"registered {entry.ref}: {args.method} of {', '.join(merge['parents'])} (weights {merge['weights']}, "
          f"rank {merge['rank']}, SVD relative error max {merge['relative_error_max']:.2e})")
    return 0


def _cmd_export(args) -> int:
    from ..merge import export_adapter_folder, export_model

    registry = open_registry(args)
    if args.adapter_only:
        for warning in export_adapter_folder(registry, args.adapter, args.out, pad_rank=args.pad_rank):
            print(f"warning: {warning}", file=sys.stderr)
        print(f"exported the adapter folder of {args.adapter} to {args.out}")
        return 0
    report = export_model(registry, args.adapter, args.out, dtype=args.dtype, base_weights=args.base_weights,
                          requantize=args.requantize, probe=args.probe, probe_tokens=args.probe_tokens)
    for variant, scores in report["variants"].items():
        print(f"{variant}: top-1 agreement {scores['top1_agreement']:.1%}, max |logit diff| "
              f"{scores['max_abs_logit_diff']:.3g}, mean {scores['mean_abs_logit_diff']:.3g}")
    floor = report["noise_floor"]
    print(f"noise floor ({floor['what']}): top-1 agreement {floor['top1_agreement']:.1%}")
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    kind = f"{args.dtype}" + (f", requantized to {args.requantize}" if args.requantize else "")
    print(f"saved a standalone model in {kind} to {args.out} (fidelity.json beside the weights)")
    return 0


def _cmd_serve(args) -> int:
    from ..server import ServerSettings, serve

    settings = ServerSettings(
        base_name=args.base, api_key=args.api_key or os.environ.get("PEFT_ADAPT_API_KEY"),
        admin_key=args.admin_key or os.environ.get("PEFT_ADAPT_ADMIN_KEY"), max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms, max_queue=args.max_queue, batch_invariant=args.batch_invariant,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it", file=sys.stderr)
    adapters = args.adapters.split(",") if args.adapters else None
    if args.ray:  # replicas run in other processes, in another working directory: they get absolute paths
        from ..registry.refs import is_folder_ref
        from ..registry.store import registry_location
        from ..server.ray_serve import serve_on_ray

        root, store, cache = registry_location(args.registry, args.store)
        registry_args = {"root": str(root.resolve()) if isinstance(root, Path) else root, "store": store,
                         "cache": str(cache.resolve()) if cache else None}
        adapters = [str(Path(a).expanduser().resolve()) if is_folder_ref(a) else a for a in adapters or []]
        base = str(Path(args.base).resolve()) if Path(args.base).exists() else args.base
        serve_on_ray(base, args.quantization, registry_args, adapters, args.host, args.port, args.task,
                     args.max_adapters, settings, args.replicas, args.ray_address)
        return 0
    serve(args.base, args.quantization, open_registry(args), adapters, args.host, args.port, args.task,
          args.max_adapters, settings)
    return 0


def _cmd_quickstart(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the quickstart is offline by definition: never wait on the hub
    from .quickstart import format_report, run_quickstart

    report = run_quickstart(
        out=args.out, domains=tuple(args.domains.split(",")), steps=args.steps, batch_size=args.batch_size,
        max_length=args.max_length, eval_blocks=args.eval_blocks, model=args.model,
        quantization=args.quantization, rank=args.rank, learning_rate=args.learning_rate,
        registry=None if args.no_register else open_registry(args),
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
    add_registry_arguments(p)
    p.add_argument("--no-register", action="store_true", help="only write the output folders")
    p.add_argument("--num-processes", type=int, default=1,
                   help="train in N processes: data parallel per domain (accelerate; gloo on the CPU)")
    p.add_argument("--parallel-domains", action="store_true",
                   help="with several processes: each worker trains different domains at the same time")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: finished domains are skipped, an interrupted one continues from "
                        "its last checkpoint (training.checkpoint_steps)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("meta-train", help="learn an adapter initialisation across a recipe's domains (Reptile); "
                                          "recipes start from it with init_from:")
    p.add_argument("recipe", help="the recipe YAML file: its domains are the tasks")
    p.add_argument("--out", help="output folder (default: runs/<recipe name>-meta)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--meta-steps", type=int, default=100, help="outer steps, one domain each")
    p.add_argument("--inner-steps", type=int, default=8, help="training steps on the domain per outer step")
    p.add_argument("--meta-lr", type=float, default=1.0, help="the first outer step's share of the way (falls to 0)")
    p.add_argument("--inner-lr", type=float, help="default: the recipe's learning_rate")
    add_registry_arguments(p)
    p.add_argument("--no-register", action="store_true", help="only write the output folder")
    p.set_defaults(func=_cmd_meta_train)

    p = sub.add_parser("registry", help="list, show, tag, remove, import, export and verify registered adapters")
    add_registry_arguments(p)
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("list", help="registered adapters, by name, then version (newest last)")
    for flag in ("--domain", "--method", "--base", "--tag"):
        a.add_argument(flag)
    a.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    a = actions.add_parser("show", help="one adapter version: NAME, NAME@VERSION or NAME@TAG")
    a.add_argument("ref")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("tag", help="point TAG at NAME@VERSION")
    a.add_argument("ref")
    a.add_argument("tag")
    a = actions.add_parser("untag", help="remove TAG from adapter NAME (the version it pointed at stays)")
    a.add_argument("name")
    a.add_argument("tag")
    a = actions.add_parser("rm", help="remove NAME@VERSION (or every version with --all-versions)")
    a.add_argument("ref")
    a.add_argument("--all-versions", action="store_true")
    a = actions.add_parser("add", help="register a folder written by `peft-adapt train`")
    a.add_argument("folder")
    a.add_argument("--name")
    a.add_argument("--domain")
    a.add_argument("--tag", action="append")
    a.add_argument("--allow-pickle", action="store_true")
    a = actions.add_parser("import", help="register an adapter folder from elsewhere (`registry export`'s, or plain "
                                          "peft causal LM), checked against its base")
    a.add_argument("folder")
    a.add_argument("--base", help="the base model it was trained on (alias, folder or hub id; default: the one its "
                                  "manifest names)")
    a.add_argument("--name", help="its name here (default: the name in its manifest)")
    a.add_argument("--domain")
    a.add_argument("--tag", action="append")
    a.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin (converted to safetensors)")
    a = actions.add_parser("export", help="copy an adapter version out as a plain peft folder")
    a.add_argument("ref")
    a.add_argument("--out", required=True)
    a = actions.add_parser("verify", help="recompute every checksum; exit 1 on any problem")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("gc", help="remove folders left unreachable by interrupted writes")
    a.add_argument("--min-age", type=float, default=3600, help="only folders older than this many seconds")
    a = actions.add_parser("sign", help="give NAME a routing signature from a file of its domain's texts (a new "
                                        "version; adapters trained here are signed already)")
    a.add_argument("ref")
    a.add_argument("file", help="a data file (its --text-field) or a text file, one text per line")
    a.add_argument("--text-field", default="text")
    a.add_argument("--quantization", choices=["none", "int8", "nf4", "fp4"], help="default: the one it was trained under")
    a.add_argument("--device", default="auto")
    for action in actions.choices.values():  # --registry after the verb too, as generate, classify and serve take it
        add_registry_arguments(action, default=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_registry)

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

    for command, helptext, func in (("generate", "continue prompts with one adapter, or one adapter per prompt", _cmd_generate),
                                    ("classify", "label texts with a classification adapter (or one per text)", _cmd_classify),
                                    ("route", "which adapter each text would be routed to, with its confidence", _cmd_route)):
        p = sub.add_parser(command, help=helptext)
        p.add_argument("prompts", nargs="*", help="texts (or use --file)")
        p.add_argument("--file", help="a text file with one text per line (lines end at \\n only"
                       + (", write \\\\n for a newline inside a prompt" if command == "generate" else "")
                       + "), or a JSONL / CSV / Parquet file or datasets folder (see --text-field)")
        p.add_argument("--text-field", default="text", help="the field that holds the text in a data file (default: text)")
        p.add_argument("--out", help="write predictions as JSONL to this file, one per input with its id")
        p.add_argument("--batch-size", type=int, default=32, help="inputs run together (default 32)")
        if command == "route":
            p.add_argument("--router", default="auto", help="auto (every signed adapter of the base and task), "
                                                          "auto:TAG, or auto:NAME,NAME,...")
            p.add_argument("--task", default="causal_lm", choices=["causal_lm", "classification"])
            p.add_argument("--threshold", type=float, default=0.5, help="below this confidence: a mix (or --fallback)")
            p.add_argument("--top-k", type=int, default=2)
            p.add_argument("--fallback", choices=["mix", "base", "nearest"])
            p.add_argument("--base", help="base model (default: the base of the registry's adapters of --task)")
            p.add_argument("--quantization", choices=["none", "int8", "nf4", "fp4"])
            p.add_argument("--device", default="auto")
            add_registry_arguments(p)
            p.add_argument("--json", action="store_true", help="one JSON object per line")
            p.set_defaults(func=func, adapter=None, adapters=None, mix=None)
            continue
        group = p.add_mutually_exclusive_group()
        group.add_argument("--adapter", help="one adapter for every text: registry NAME[@VERSION|@TAG] or a folder; "
                                             "auto (or auto:TAG) routes each text to its domain's adapter")
        group.add_argument("--adapters", help="comma-separated, one per text (base for none)")
        group.add_argument("--mix", help="one linear mix of adapters for every text, e.g. --mix books=0.5,dvd=0.5 "
                                         "(LoRA; classifiers need one label map)")
        p.add_argument("--base", help="base model (default: the one the first adapter was trained on)")
        p.add_argument("--quantization", choices=["none", "int8", "nf4", "fp4"])
        p.add_argument("--device", default="auto")
        add_registry_arguments(p)
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        if command == "generate":
            p.add_argument("--max-new-tokens", type=int, default=64)
            p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
            p.add_argument("--temperature", type=float, default=1.0)
            p.add_argument("--top-p", type=float, default=1.0)
            p.add_argument("--seed", type=int)
        p.set_defaults(func=func)

    from ..merge import METHODS

    p = sub.add_parser("merge", help="combine LoRA adapters of one base into a new registered adapter")
    p.add_argument("adapters", nargs="+", help="registry refs: NAME, NAME@VERSION or NAME@TAG")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--weights", help="comma-separated, one per adapter (default: equal, summing to 1)")
    p.add_argument("--density", type=float, default=1.0, help="share of entries kept (ties, dare_*, magnitude_prune)")
    p.add_argument("--seed", type=int, default=0, help="for DARE's random drop")
    p.add_argument("--rank", type=int, help="rank of the result (default: see README)")
    p.add_argument("--name", required=True, help="name of the new adapter")
    add_registry_arguments(p)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("export", help="fold an adapter into its base and save a standalone model")
    p.add_argument("adapter", help="registry ref: NAME, NAME@VERSION or NAME@TAG")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--base-weights", default="dequantized", choices=["dequantized", "original"],
                   help="fold into the dequantized quantized weights it was trained on (default) or the originals")
    p.add_argument("--requantize", choices=["nf4", "int8"], help="quantize the merged model again (never the default)")
    p.add_argument("--probe", help="probe text for fidelity.json (default: the adapter's eval data)")
    p.add_argument("--probe-tokens", type=int, default=1024)
    p.add_argument("--adapter-only", action="store_true", help="export the adapter folder for peft / vLLM instead")
    p.add_argument("--pad-rank", action="store_true", help="with --adapter-only: pad the rank to one vLLM accepts")
    add_registry_arguments(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: one base, every adapter, batched across adapters")
    p.add_argument("--base", required=True, help="base model: alias, folder or hub id")
    p.add_argument("--quantization", default="nf4", choices=["none", "int8", "nf4", "fp4"])
    p.add_argument("--task", default="auto", choices=["auto", "causal_lm", "classification"])
    add_registry_arguments(p)
    p.add_argument("--adapters", help="comma-separated adapters to load (and pin) at start")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or $PEFT_ADAPT_API_KEY)")
    p.add_argument("--admin-key", help="key for /v1/adapters/load and /unload (or $PEFT_ADAPT_ADMIN_KEY)")
    p.add_argument("--max-adapters", type=int, help="resident adapters at most (least recently used are evicted)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt (default and upper bound: the base's positions)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000)
    p.add_argument("--ray", action="store_true", help="serve as replicas on Ray Serve, each request routed to a "
                                                      "replica holding its adapter (pip install 'peft-adapt[ray]')")
    p.add_argument("--replicas", type=int, default=2, help="with --ray: server replicas, one base each")
    p.add_argument("--ray-address", help="with --ray: join this Ray cluster (default: start a local one)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="every request's output independent of what it is batched with (each row runs alone)")
    p.set_defaults(func=_cmd_serve)

    from ..data.corpora import CORPORA

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
    add_registry_arguments(p)
    p.add_argument("--no-register", action="store_true", help="do not register the adapters as quickstart-<domain>")
    p.set_defaults(func=_cmd_quickstart)
    for command in sub.choices.values():
        command.add_argument("--threads", type=_threads_arg, default=None,
                             help="CPU threads per process (default: auto, the cores shared by the processes)")
    return parser


def add_registry_arguments(parser, default=None) -> None:
    parser.add_argument("--registry", default=default,
                        help="a registry folder (default: $PEFT_ADAPT_REGISTRY, $PEFT_ADAPT_HOME or ~/.peft_adapt), a "
                             "postgresql:// URL (a team's shared registry, with --store) or a registry config YAML")
    parser.add_argument("--store", default=default, help="with a postgresql:// registry: where its files live "
                                                         "(s3://bucket/prefix; default: $PEFT_ADAPT_STORE)")


def open_registry(args) -> Registry:
    return Registry(getattr(args, "registry", None), store=getattr(args, "store", None))


def _threads_arg(value: str):
    if value == "auto" or (value.isdigit() and int(value) >= 1):
        return value if value == "auto" else int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: give a number of threads (1 or more) or auto")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command != "train":  # training sets its threads from the recipe (which --threads overrides)
            from ..training.threads import configure_threads

            configure_threads(args.threads)
        return args.func(args)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        return 0


if __name__ == "__main__":
    sys.exit(main())
