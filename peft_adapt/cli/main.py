"""`peft-adapt`: a thin front end. It parses arguments, calls the library and prints; nothing more.

The parser is built from one small function per verb, each in the module of its verb (`train.py`, `registry.py`,
`run.py`, `export.py`, `serve.py`). A verb imports the library parts it runs inside its own function, so the command
starts without torch and `peft-adapt registry list` answers at once."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import UserInputError
from .common import threads_arg
from .export import add_export, add_merge
from .registry import add_registry
from .run import add_classify, add_eval, add_generate, add_route, add_tag
from .serve import add_serve
from .train import add_meta_train, add_quickstart, add_train

VERBS = (add_train, add_meta_train, add_registry, add_eval, add_generate, add_classify, add_tag, add_route, add_merge,
         add_export, add_serve, add_quickstart)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-adapt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_verb in VERBS:
        add_verb(sub)
    for command in sub.choices.values():
        command.add_argument("--threads", type=threads_arg, default=None,
                             help="CPU threads per process (default: auto, the cores shared by the processes)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command != "train":  # training sets its threads from the recipe (which --threads overrides)
            from ..training.threads import configure_threads  # lazy: the CLI starts without torch

            configure_threads(args.threads)
        return args.func(args)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        return 0


if __name__ == "__main__":
    sys.exit(main())
