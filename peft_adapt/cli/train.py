"""`train`, `meta-train` and `quickstart`: from a recipe (or the built-in corpora) to registered adapters."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .common import add_registry_arguments, open_registry


def add_train(sub) -> None:
    """`train RECIPE`: one adapter per domain."""
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace output folders that hold a previous run (a folder of anything else is never replaced)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: finished domains are skipped, an interrupted one continues from "
                        "its last checkpoint (training.checkpoint_steps)")
    p.set_defaults(func=_cmd_train)


def add_meta_train(sub) -> None:
    """`meta-train RECIPE`: an adapter initialisation across the recipe's domains."""
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
    p.add_argument("--overwrite", action="store_true", help="replace an output folder that holds a previous run")
    p.set_defaults(func=_cmd_meta_train)


def add_quickstart(sub) -> None:
    """`quickstart`: the offline demo."""
    from ..data.corpora import CORPORA  # lazy: the CLI starts without torch
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


def _cmd_train(args) -> int:
    from ..training.distributed import world  # lazy: the CLI starts without torch
    from ..training.domain import train_recipe  # lazy: the CLI starts without torch
    from ..training.recipe import load_recipe  # lazy: the CLI starts without torch

    if args.threads is not None:
        args.set.append(f"training.threads={args.threads}")
    recipe = load_recipe(args.recipe, args.set)  # a bad recipe fails here, before any worker starts
    out = Path(args.out) if args.out else Path("runs") / (recipe.name or Path(args.recipe).stem)
    if args.num_processes > 1 and world().size == 1:
        return _launch_workers(args, out)
    registry = None if args.no_register else open_registry(args)
    train_recipe(recipe, out, args.domain, registry=registry, stack_registry=open_registry(args),
                 parallel_domains=args.parallel_domains,
                 resume=args.resume, overwrite=args.overwrite, report=lambda line: print(line, flush=True))
    return 0


def _cmd_meta_train(args) -> int:
    from ..training.domain import result_line  # lazy: the CLI starts without torch
    from ..training.meta import MetaSettings, meta_train  # lazy: the CLI starts without torch
    from ..training.recipe import load_recipe  # lazy: the CLI starts without torch

    recipe = load_recipe(args.recipe, args.set)
    out = Path(args.out) if args.out else Path("runs") / f"{recipe.name or Path(args.recipe).stem}-meta"
    settings = MetaSettings(args.meta_steps, args.inner_steps, args.meta_lr, args.inner_lr)
    result = meta_train(recipe, out, settings, None if args.no_register else open_registry(args), args.overwrite)
    print(result_line(result), flush=True)
    return 0


def _launch_workers(args, out: Path) -> int:
    """Run this same command in N workers (accelerate on GPUs, torch.distributed.run on the CPU)."""
    import shutil
    import subprocess
    import uuid

    from ..training.distributed import failures, launch_command  # lazy: the CLI starts without torch

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


def _cmd_quickstart(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the quickstart is offline by definition: never wait on the hub
    from .quickstart import format_report, run_quickstart  # lazy: the CLI starts without torch

    report = run_quickstart(
        out=args.out, domains=tuple(args.domains.split(",")), steps=args.steps, batch_size=args.batch_size,
        max_length=args.max_length, eval_blocks=args.eval_blocks, model=args.model,
        quantization=args.quantization, rank=args.rank, learning_rate=args.learning_rate,
        registry=None if args.no_register else open_registry(args),
    )
    print(format_report(report))
    print(f"report: {Path(args.out) / 'report.json'}  heatmap: {Path(args.out) / 'perplexity_heatmap.png'}")
    return 0
