"""`registry ACTION`: list, show, tag, remove, add, import, export, verify, gc and sign registered adapters."""

from __future__ import annotations

import argparse
import json

from ..errors import UserInputError
from .common import add_registry_arguments, headline, open_registry, print_table


def add_registry(sub) -> None:
    """`registry ACTION ...`."""
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
            print_table(
                [{"name": e.name, "version": e.version, "domain": e.domain, "method": e.method,
                  "base": e.base_model, "quant": e.quantization, "metric": headline(e.metrics),
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
        from ..routing.router import sign_registered  # lazy: the CLI starts without torch

        entry = sign_registered(registry, args.ref, args.file, args.text_field, args.quantization, args.device)
        print(f"signed {entry.ref} from {args.file} (routing picks it from now on)")
    return 0
