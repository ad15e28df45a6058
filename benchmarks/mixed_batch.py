"""Mixed-adapter batches: ours against peft, K distinct LoRA adapters over max(32, K) rows.

For each model, adapter shape, K and regime, prints one JSON line with tokens/s of:
- `base`: the base model alone (no adapter);
- `peft_single`: peft with one adapter for all rows (the reference: serving a single adapter today);
- `peft_mixed`: peft with `adapter_names=` (one per row; peft loops over the distinct adapters);
- `peft_switch`: peft with `set_adapter` per group of rows, one call per group;
- `ours`: `AdapterRuntime` with one adapter name per row (one gathered batched matmul per layer).
`value` is ours, `baseline` peft_single, `ratio` ours / peft_single, and `ratio_vs_peft_mixed` too.
Regimes: `prefill` (one forward over the rows, `--prompt-tokens` each) and `generation` (one prompt a row,
`--new-tokens` new tokens, greedy, KV cache). Shapes: rank 8 on q_proj/v_proj, rank 16 on all linear layers.
On a shared machine the load drifts: the compared variants are interleaved (every repeat runs each of them once,
in turn) and each figure is the median of `--repeats` (at least 3), so a drift touches them all alike.
`--quick` only fills the flags not given: `--quick --new-tokens 32` measures 32.

    python benchmarks/mixed_batch.py --quick                         # CPU, minutes
    python benchmarks/mixed_batch.py --models smollm2-135m,random    # the full grid (a GPU, or patience)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {"r8-qv": (8, ["q_proj", "v_proj"]), "r16-all": (16, "all-linear")}


def _interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per function: one warm-up each, then `repeats` rounds that run every function once in turn."""
    import torch

    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _random_model(path: Path, hidden: int, layers: int) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peft_adapt.models.backbone import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 192), max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _prompts(tokenizer, rows: int, length: int) -> list[list[int]]:
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:40])
    ids = tokenizer(text)["input_ids"]
    return [ids[i * 7 : i * 7 + length] for i in range(rows)]


def run(model_name: str, base_path: str, quantization: str, shape: str, ks: list[int], regimes: list[str],
        prompt_tokens: int, new_tokens: int, gen_prompt_tokens: int, repeats: int, device_name: str, work: Path):
    import torch
    from peft import LoraConfig, get_peft_model

    from peft_adapt import AdapterRuntime
    from peft_adapt.models.backbone import BaseSpec, load_backbone

    rank, targets = SHAPES[shape]
    k_max = max(ks)
    spec = BaseSpec(model=base_path, quantization=quantization)
    # peft: every adapter added before any inference (DESIGN.md trap), weights random and non-zero
    peft_backbone = load_backbone(spec)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(peft_backbone.model, config, adapter_name="a0")
    for i in range(1, k_max):
        peft_model.add_adapter(f"a{i}", config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.02)
    peft_model.eval()
    folders = []
    for i in range(k_max):
        folder = work / f"{shape}-a{i}"
        peft_model.save_pretrained(folder, selected_adapters=[f"a{i}"])
        folders.append(folder / f"a{i}")  # peft saves a named adapter into a subfolder of that name
    runtime = AdapterRuntime(spec, initial_capacity=k_max + 1)
    for folder in folders:
        runtime.load(str(folder))
    plain = load_backbone(spec).model.eval()
    pad = peft_backbone.tokenizer.pad_token_id
    tokenizer = peft_backbone.tokenizer
    for k in ks:
        rows = max(32, k)
        names = [f"a{r * k // rows}" for r in range(rows)]  # rows spread evenly over the K adapters
        ours_names = [str(folders[int(n[1:])]) for n in names]
        groups = {}
        for r, n in enumerate(names):
            groups.setdefault(n, []).append(r)
        for regime in regimes:
            if regime == "prefill":
                ids = torch.tensor(_prompts(tokenizer, rows, prompt_tokens), device=runtime.device)
                tokens = ids.numel()

                def base_fn():
                    with torch.no_grad():
                        plain(input_ids=ids)

                def peft_single():
                    peft_model.set_adapter("a0")
                    with torch.no_grad():
                        peft_model(input_ids=ids)

                def peft_mixed():
                    with torch.no_grad():
                        peft_model(input_ids=ids, adapter_names=names)

                def peft_switch():
                    with torch.no_grad():
                        for n, rs in groups.items():
                            peft_model.set_adapter(n)
                            peft_model(input_ids=ids[rs])

                def ours():
                    runtime.logits(ids, adapters=ours_names)
            else:
                prompts = _prompts(tokenizer, rows, gen_prompt_tokens)
                ids = torch.tensor(prompts, device=runtime.device)
                mask = torch.ones_like(ids)
                tokens = rows * new_tokens
                options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                               temperature=None, top_p=None, top_k=None)

                def base_fn():
                    with torch.no_grad():
                        plain.generate(input_ids=ids, attention_mask=mask, **options)

                def peft_single():
                    peft_model.set_adapter("a0")
                    with torch.no_grad():
                        peft_model.generate(input_ids=ids, attention_mask=mask, **options)

                def peft_mixed():
                    with torch.no_grad():
                        peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **options)

                def peft_switch():
                    with torch.no_grad():
                        for n, rs in groups.items():
                            peft_model.set_adapter(n)
                            peft_model.generate(input_ids=ids[rs], attention_mask=mask[rs], **options)

                def ours():
                    runtime.generate(prompts, adapters=ours_names, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, return_tokens=True)

            seconds = _interleaved({"base": base_fn, "peft_single": peft_single, "peft_mixed": peft_mixed,
                                    "peft_switch": peft_switch, "ours": ours}, repeats)
            speeds = {name: tokens / s for name, s in seconds.items()}
            print(json.dumps({
                "name": f"mixed_batch_{regime}_tokens_per_s", "model": model_name, "quantization": quantization,
                "shape": shape, "K": k, "rows": rows, "value": speeds["ours"], "baseline": speeds["peft_single"],
                "ratio": speeds["ours"] / speeds["peft_single"],
                "ratio_vs_peft_mixed": speeds["ours"] / speeds["peft_mixed"],
                "peft_mixed_vs_single": speeds["peft_mixed"] / speeds["peft_single"],
                "peft_switch_vs_single": speeds["peft_switch"] / speeds["peft_single"],
                "tokens_per_s": speeds, "repeats": repeats, "prompt_tokens": prompt_tokens,
                "new_tokens": new_tokens, "device": device_name,
            }), flush=True)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized: K=1,4,32, short prompts, 8 new tokens")
    parser.add_argument("--models", default="smollm2-135m", help="comma-separated: smollm2-135m, random")
    parser.add_argument("--random-hidden", type=int, default=576, help="hidden size of the random Llama model")
    parser.add_argument("--random-layers", type=int, default=30)
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--ks", default=None, help="distinct adapters per batch (default 1,4,16,32,64; quick 1,4,32)")
    parser.add_argument("--regimes", default="prefill,generation")
    parser.add_argument("--prompt-tokens", type=int, help="prefill tokens per row (default 128; quick 64)")
    parser.add_argument("--new-tokens", type=int, help="generated tokens per row (default 32; quick 8)")
    parser.add_argument("--gen-prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per figure (at least 3)")
    args = parser.parse_args()
    quick = {"prompt_tokens": 64, "new_tokens": 8, "ks": "1,4,32"}
    full = {"prompt_tokens": 128, "new_tokens": 32, "ks": "1,4,16,32,64"}
    for key, value in (quick if args.quick else full).items():  # only what the command line left unset
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 3:
        parser.error("--repeats: medians need at least 3 rounds")
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    work = Path(tempfile.mkdtemp(prefix="bench_mixed_"))
    try:
        for model in args.models.split(","):
            path = model
            if model == "random":
                path = str(_random_model(work / "random", args.random_hidden, args.random_layers))
                model = f"random-llama-h{args.random_hidden}-l{args.random_layers}"
            for shape in args.shapes.split(","):
                run(model, path, args.quantization, shape, [int(k) for k in args.ks.split(",")],
                    args.regimes.split(","), args.prompt_tokens, args.new_tokens, args.gen_prompt_tokens,
                    args.repeats, device_name, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
