"""`merge` and `export`: combine adapters, fold one into its base."""

from __future__ import annotations

import sys

from ..errors import UserInputError
from .common import add_registry_arguments, open_registry


def add_merge(sub) -> None:
    """`merge ADAPTER ... --method M --name N`."""
    p = sub.add_parser("merge", help="combine LoRA adapters of one base into a new registered adapter")
    p.add_argument("adapters", nargs="+", help="registry refs: NAME, NAME@VERSION or NAME@TAG")
    p.add_argument("--method", required=True,
                   help="cat, linear, svd, ties, dare_linear, dare_ties or magnitude_prune (the merge table's names)")
    p.add_argument("--weights", help="comma-separated, one per adapter (default: equal, summing to 1)")
    p.add_argument("--density", type=float, default=1.0, help="share of entries kept (ties, dare_*, magnitude_prune)")
    p.add_argument("--seed", type=int, default=0, help="for DARE's random drop")
    p.add_argument("--rank", type=int, help="rank of the result (default: see README)")
    p.add_argument("--name", required=True, help="name of the new adapter")
    add_registry_arguments(p)
    p.set_defaults(func=_cmd_merge)


def add_export(sub) -> None:
    """`export ADAPTER --out DIR`."""
    p = sub.add_parser("export", help="fold an adapter into its base and save a standalone model")
    p.add_argument("adapter", help="registry ref: NAME, NAME@VERSION or NAME@TAG")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="safetensors", choices=["safetensors", "gguf"],
                   help="safetensors (transformers, vLLM, peft) or gguf (llama.cpp, Ollama, LM Studio)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="safetensors export's dtype (default bf16)")
    p.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"],
                   help="gguf export's tensor type (default f32; norms stay f32; q8_0 keeps f16 for rows not a "
                        "multiple of 32)")
    p.add_argument("--with-base", action="store_true",
                   help="with --format gguf --adapter-only: also write base.gguf, the base as the adapter was trained "
                        "on it")
    p.add_argument("--base-weights", default="dequantized", choices=["dequantized", "original"],
                   help="fold into the dequantized quantized weights it was trained on (default) or the originals")
    p.add_argument("--requantize", choices=["nf4", "int8"], help="quantize the merged model again (never the default)")
    p.add_argument("--fidelity", choices=["weights", "logits", "none"], default="weights",
                   help="fidelity.json: what the saved weights keep of the adapter, module by module (default; memory "
                        "of one layer), or the whole model's logits against the unmerged one (holds the model)")
    p.add_argument("--no-fidelity", dest="fidelity", action="store_const", const="none",
                   help="measure nothing, write no fidelity.json")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard written (default 2GB)")
    p.add_argument("--probe", help="probe text for --fidelity logits (default: the adapter's eval data)")
    p.add_argument("--probe-tokens", type=int, default=1024)
    p.add_argument("--adapter-only", action="store_true", help="export the adapter folder for peft / vLLM instead")
    p.add_argument("--pad-rank", action="store_true", help="with --adapter-only: pad the rank to one vLLM accepts")
    add_registry_arguments(p)
    p.set_defaults(func=_cmd_export)


def _cmd_merge(args) -> int:
    from ..merge import combine_adapters  # lazy: the CLI starts without torch

    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    entry = combine_adapters(open_registry(args), args.adapters, args.method, args.name, weights=weights,
                             density=args.density, seed=args.seed, rank=args.rank)
    merge = entry.manifest.merge
    print(f"registered {entry.ref}: {args.method} of {', '.join(merge['parents'])} (weights {merge['weights']}, "
          f"rank {merge['rank']}, SVD relative error max {merge['relative_error_max']:.2e})")
    return 0


def _cmd_export(args) -> int:
    from ..merge import export_adapter_folder, export_model  # lazy: the CLI starts without torch

    # an option of the other format is refused, not ignored
    other = (("--dtype", args.dtype), ("--requantize", args.requantize), ("--pad-rank", args.pad_rank),
             ("--max-shard-size", args.max_shard_size != "2GB")) if args.format == "gguf" else (
             ("--outtype", args.outtype), ("--with-base", args.with_base))
    for flag, given in other:
        if given:
            raise UserInputError(f"{flag} does not apply to --format {args.format}: leave it out" + (
                " (--outtype sets a GGUF file's tensor type)" if flag in ("--dtype", "--requantize") else ""))
    registry = open_registry(args)
    if args.format == "gguf":
        args.outtype = args.outtype or "f32"
        return _export_gguf(registry, args)
    args.dtype = args.dtype or "bf16"
    if args.adapter_only:
        for warning in export_adapter_folder(registry, args.adapter, args.out, pad_rank=args.pad_rank):
            print(f"warning: {warning}", file=sys.stderr)
        print(f"exported the adapter folder of {args.adapter} to {args.out}")
        return 0
    report = export_model(registry, args.adapter, args.out, dtype=args.dtype, base_weights=args.base_weights,
                          requantize=args.requantize, probe=args.probe, probe_tokens=args.probe_tokens,
                          max_shard_size=args.max_shard_size, fidelity=args.fidelity)
    _print_fidelity(report, f"{args.dtype} weights")
    for warning in report.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    kind = f"{args.dtype}" + (f", requantized to {args.requantize}" if args.requantize else "")
    beside = " (fidelity.json beside the weights)" if args.fidelity != "none" else ""
    print(f"saved a standalone model in {kind} to {args.out}{beside}")
    return 0


def _export_gguf(registry, args) -> int:
    from ..merge.gguf_export import export_gguf  # lazy: the CLI starts without torch

    report = export_gguf(registry, args.adapter, args.out, outtype=args.outtype, base_weights=args.base_weights,
                         adapter_only=args.adapter_only, with_base=args.with_base, probe=args.probe,
                         probe_tokens=args.probe_tokens, fidelity=args.fidelity)
    _print_fidelity(report, f"{args.outtype} tensors", run_by="llama.cpp, ")
    if "tokenization" in report:
        print(f"llama.cpp's tokenizer splits {report['tokenization']['texts_tokenized_alike']:.0%} of the probe texts "
              f"as the model's own does")
    for warning in report.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"saved {', '.join(report['files'])} ({args.outtype}) with a Modelfile and README to {args.out}")
    return 0


def _print_fidelity(report: dict, saved: str, run_by: str = "") -> None:
    """fidelity.json's figures, a line each: what the saved weights keep, or each variant's logits and the floor."""
    if report.get("fidelity") == "weights" and report.get("modules"):
        print(f"the saved {saved} keep {report['adapter_kept_mean']:.2%} of the adapter's change on average over "
              f"{report['modules']} modules (least: {report['adapter_kept_min']:.2%}, {report['worst_module']})")
    for variant, scores in report.get("variants", {}).items():
        print(f"{run_by}{variant}: top-1 agreement {scores['top1_agreement']:.1%}, max |logit diff| "
              f"{scores['max_abs_logit_diff']:.3g}, mean {scores['mean_abs_logit_diff']:.3g}")
    if "noise_floor" in report:
        floor = report["noise_floor"]
        print(f"noise floor ({floor['what']}): top-1 agreement {floor['top1_agreement']:.1%}")
