"""`serve`: the HTTP server, in one process or as Ray Serve replicas."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..registry.refs import is_folder_ref
from ..registry.store import registry_location
from .common import add_registry_arguments, open_registry

DEFAULT_MAX_ADAPTERS = 32  # requests name adapters: without a budget every name a client sends stays resident


def add_serve(sub) -> None:
    """`serve --base MODEL`."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: one base, every adapter, batched across adapters")
    p.add_argument("--base", required=True, help="base model: alias, folder or hub id")
    p.add_argument("--quantization", default="nf4", choices=["none", "int8", "nf4", "fp4"])
    p.add_argument("--task", default="auto", choices=["auto", "causal_lm", "classification", "seq2seq"])
    add_registry_arguments(p)
    p.add_argument("--adapters", help="comma-separated adapters to load (and pin) at start")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or $PEFT_ADAPT_API_KEY)")
    p.add_argument("--admin-key", help="key for /v1/adapters/load and /unload (or $PEFT_ADAPT_ADMIN_KEY)")
    p.add_argument("--max-adapters", type=int, default=DEFAULT_MAX_ADAPTERS,
                   help=f"resident adapters at most, least recently used evicted (default {DEFAULT_MAX_ADAPTERS}, "
                        f"or the --adapters pinned at start plus 8)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--scheduler", default="step", choices=["step", "request"],
                   help="step: continuous batching, requests join and leave the running batch at each decode step "
                        "(default); request: whole requests per batch")
    p.add_argument("--kv-budget", type=int, help="cache positions (tokens x rows) running requests may hold; more "
                                                  "wait (default: 32768, or one longest request)")
    p.add_argument("--prefill-chunk", type=int, default=128, help="prompt tokens read per decode step")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt (default and upper bound: the base's positions)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000)
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds a request's headers may take to arrive")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds its body may take after them")
    p.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle connection stays open")
    p.add_argument("--max-connections", type=int, default=512, help="connections open at once, in all")
    p.add_argument("--max-connections-per-peer", type=int, default=64, help="connections open at once from one address")
    p.add_argument("--ray", action="store_true", help="serve as replicas on Ray Serve, each request routed to a "
                                                      "replica holding its adapter (pip install 'peft-adapt[ray]')")
    p.add_argument("--replicas", type=int, default=2, help="with --ray: server replicas, one base each")
    p.add_argument("--ray-address", help="with --ray: join this Ray cluster (default: start a local one)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="every request's output independent of what it is batched with (each row runs alone)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from ..server import ServerSettings, serve  # lazy: the CLI starts without torch
    from ..server.public import public_base_name  # lazy: the CLI starts without torch

    settings = ServerSettings(
        base_name=public_base_name(args.base), api_key=args.api_key or os.environ.get("PEFT_ADAPT_API_KEY"),
        admin_key=args.admin_key or os.environ.get("PEFT_ADAPT_ADMIN_KEY"), max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms, max_queue=args.max_queue, batch_invariant=args.batch_invariant,
        header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout, keep_alive_s=args.keep_alive,
        max_connections=args.max_connections, max_connections_per_peer=args.max_connections_per_peer,
        scheduler=args.scheduler, kv_budget=args.kv_budget, prefill_chunk=args.prefill_chunk,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it", file=sys.stderr)
    adapters = args.adapters.split(",") if args.adapters else None
    if adapters and args.max_adapters == DEFAULT_MAX_ADAPTERS:
        args.max_adapters = max(DEFAULT_MAX_ADAPTERS, len(adapters) + 8)  # the pinned ones leave room to serve others
    if args.ray:  # replicas run in other processes, in another working directory: they get absolute paths
        from ..server.ray_serve import serve_on_ray  # lazy: the CLI starts without torch

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
