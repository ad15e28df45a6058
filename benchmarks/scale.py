"""Memory and time against model size: ours and plain peft/transformers doing the same job, size by size.

Builds random-weight Llama models of TinyLlama's shape and smaller (bf16, 500 MB shards, as hub models ship) and four
random rank-16 LoRA adapters on every linear layer of each, then runs each operation in a fresh process, ours and the
baseline one after the other, and reads that process's peak resident memory (VmHWM) above what it held once its
imports were done (the interpreter's own, reported apart as `baseline_mib`), and the peak of its anonymous memory alone
(`anon_peak_mib`, sampled every 5 ms: the peak above counts the pages of a memory-mapped checkpoint too, page cache
the kernel takes back under pressure):
- train: 3 QLoRA steps on nf4 (batch 1, 64 tokens); ours `train_domain`, plain: transformers + peft + a loop;
- export: fold an adapter trained on nf4 into its base and save a standalone bf16 model; ours streamed (without and
  with its bounded fidelity check), plain: the base in bf16, `merge_and_unload`, `save_pretrained`;
- merge: TIES of two adapters at density 0.5; ours `combine_adapters`, plain: peft's `add_weighted_adapter` (it
  needs the base loaded);
- runtime: an nf4 base with the four adapters loaded, the peak while loading and the memory held idle afterwards;
  ours `AdapterRuntime`, plain: transformers nf4 + `PeftModel.load_adapter`.
Prints one JSON line per size and operation, then per operation the slope (MiB per billion parameters, least squares
over the sizes) and its extrapolation to 8B and 70B, with whether that fits a 32 GB and a 64 GB machine.

    python benchmarks/scale.py [--sizes 0.15b,0.4b,1.1b] [--ops train,export,merge,runtime] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 2**20


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":"))) * 1024


def _forget_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from VmRSS


# ---- one operation, in its own process


def _texts(work: Path) -> Path:
    import pydoc_data.topics

    path = work / "train.jsonl"
    if not path.exists():
        topics = pydoc_data.topics.topics
        path.write_text("".join(json.dumps({"text": topics[k][:400]}) + "\n" for k in sorted(topics)[:64]))
    return path


def _registry(work: Path, size: str):
    """The four adapters, registered as trained on this base in nf4."""
    from peft_adapt import Registry
    from peft_adapt.formats import build_manifest, write_manifest
    from peft_adapt.models.backbone import BaseSpec
    from peft_adapt.models.fingerprint import base_fingerprint

    registry = Registry(work / size / "registry")
    if registry.list():
        return registry
    base = work / size / "model"
    for i in range(4):
        folder = work / size / f"lora{i}"
        manifest = build_manifest(folder, base=BaseSpec(model=str(base), quantization="nf4"), name=f"d{i}",
                                  domain=f"d{i}", method="lora", task="causal_lm",
                                  base_fingerprint=base_fingerprint(base))
        write_manifest(folder, manifest)
        registry.add(folder)
    return registry


def child(op: str, side: str, work: Path, size: str) -> dict:
    import peft  # noqa: F401 (every import before the baseline)
    import torch
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import peft_adapt.merge.export  # noqa: F401
    import peft_adapt.runtime  # noqa: F401
    import peft_adapt.training.domain  # noqa: F401

    base = work / size / "model"
    registry = _registry(work, size)
    out = work / size / f"out-{op}-{side}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    baseline, anon_baseline = _status("VmRSS"), _status("RssAnon")
    anon_peak, running = [anon_baseline], [True]

    def sample() -> None:  # the kernel keeps no peak of anonymous memory alone (VmHWM counts mapped files too)
        while running[0]:
            anon_peak[0] = max(anon_peak[0], _status("RssAnon"))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _forget_peak()
    started = time.perf_counter()
    result = {}
    if op == "train" and side == "ours":
        from peft_adapt import parse_recipe, train_domain

        recipe = parse_recipe({
            "name": "scale", "base": {"model": str(base), "quantization": "nf4"},
            "task": {"type": "causal_lm", "max_length": 64},
            "adapter": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
            "training": {"max_steps": 3, "batch_size": 1, "learning_rate": 1e-4, "seed": 0,
                         "threads": torch.get_num_threads()},
            "domains": {"d": {"train": str(_texts(work))}}})
        train_domain(recipe, "d", out)
    elif op == "train":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, quantization_config=quant,
                                                     device_map={"": "cpu"})
        model = get_peft_model(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), LoraConfig(
            r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"))
        tokenizer = AutoTokenizer.from_pretrained(base)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        rows = [json.loads(line)["text"] for line in _texts(work).read_text().splitlines()]
        for step in range(3):
            batch = tokenizer(rows[step], return_tensors="pt", truncation=True, max_length=64)
            loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.save_pretrained(out)
    elif op in ("export", "export_fidelity") and side == "ours":
        from peft_adapt import export_model

        report = export_model(registry, "d0", out, dtype="bf16",
                              fidelity="weights" if op == "export_fidelity" else "none")
        result = {k: report[k] for k in ("adapter_kept_min", "adapter_kept_mean") if k in report}
    elif op == "export":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, registry.get("d0").path).merge_and_unload()
        model.save_pretrained(out, max_shard_size="2GB")
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    elif op == "merge" and side == "ours":
        from peft_adapt import Registry, combine_adapters

        scratch = Registry(out / "registry")  # a copy of the two parents, so every run starts alike
        for name in ("d0", "d1"):
            scratch.add(registry.get(name).path)
        combine_adapters(scratch, ["d0", "d1"], "ties", "merged", weights=[0.5, 0.5], density=0.5, rank=16)
    elif op == "merge":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, registry.get("d0").path, adapter_name="d0")
        model.load_adapter(registry.get("d1").path, adapter_name="d1")
        model.add_weighted_adapter(["d0", "d1"], [0.5, 0.5], "merged", combination_type="ties_svd", density=0.5,
                                   svd_rank=16)
        model.save_pretrained(out, selected_adapters=["merged"])
    elif op == "runtime" and side == "ours":
        from peft_adapt import AdapterRuntime

        runtime = AdapterRuntime(str(base), quantization="nf4", device="cpu", registry=registry)
        for i in range(4):
            runtime.load(f"d{i}")
        result["idle_mib"] = (_status("VmRSS") - baseline) / MIB
    elif op == "runtime":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, quantization_config=quant,
                                                     device_map={"": "cpu"})
        model = PeftModel.from_pretrained(model, registry.get("d0").path, adapter_name="d0")
        for i in range(1, 4):
            model.load_adapter(registry.get(f"d{i}").path, adapter_name=f"d{i}")
        result["idle_mib"] = (_status("VmRSS") - baseline) / MIB
    else:
        raise SystemExit(f"unknown operation {op} {side}")
    seconds = time.perf_counter() - started
    running[0] = False
    sampler.join()
    return result | {"peak_mib": (_status("VmHWM") - baseline) / MIB, "baseline_mib": baseline / MIB,
                     "anon_peak_mib": (anon_peak[0] - anon_baseline) / MIB, "seconds": seconds}


# ---- the driver


def build(work: Path, size: str) -> int:
    from peft_adapt.models.shards import Checkpoint
    from peft_adapt.testing.tiny_models import build_random_llama, write_random_lora

    model = work / size / "model"
    if not (model / "config.json").exists():
        build_random_llama(model, size)
    for i in range(4):
        if not (work / size / f"lora{i}" / "adapter_config.json").exists():
            write_random_lora(model, work / size / f"lora{i}", 16, TARGETS, seed=i)
    checkpoint = Checkpoint(model)
    return sum(_count(info.shape) for info in checkpoint.tensors.values())


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def run_child(args, op: str, side: str, size: str) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, __file__, "--child", op, side, size, "--work", str(args.work),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line through (billions of parameters, MiB): slope and intercept."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return slope, my - slope * mx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="0.15b,0.4b,1.1b")
    parser.add_argument("--ops", default="train,export,export_fidelity,merge,runtime")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "peft_adapt_scale")
    parser.add_argument("--child", nargs=3, metavar=("OP", "SIDE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(*args.child[:2], args.work, args.child[2])), flush=True)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes.split(","):
        params = build(args.work, size)
        checkpoint_mib = params * 2 / MIB
        for op in args.ops.split(","):
            ours = run_child(args, op, "ours", size)
            plain = run_child(args, op, "plain", size) if op != "export_fidelity" else {}
            row = {"name": "scale", "size": size, "params": params, "op": op, "threads": args.threads,
                   "checkpoint_bf16_mib": round(checkpoint_mib, 1),
                   **{f"ours_{k}": round(v, 3) if isinstance(v, float) else v for k, v in ours.items()},
                   **{f"plain_{k}": round(v, 3) if isinstance(v, float) else v for k, v in plain.items()}}
            if "peak_mib" in ours and "peak_mib" in plain:
                row["peak_ratio"] = round(ours["peak_mib"] / plain["peak_mib"], 3)
                row["time_ratio"] = round(ours["seconds"] / plain["seconds"], 3)
            if "idle_mib" in ours:
                row["ours_idle_over_checkpoint"] = round(ours["idle_mib"] / checkpoint_mib, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    for op in args.ops.split(","):
        for side in ("ours", "plain"):
            for measure in ("peak_mib", "anon_peak_mib", "idle_mib"):
                key = f"{side}_{measure}"
                points = [(r["params"] / 1e9, r[key]) for r in rows if r["op"] == op and key in r]
                if len(points) < 2:
                    continue
                slope, intercept = fit(points)
                at = {b: intercept + slope * b for b in (8, 70)}
                baseline = max(r[f"{side}_baseline_mib"] for r in rows if r["op"] == op and f"{side}_baseline_mib" in r)
                print(json.dumps({"name": "scale_slope", "op": op, "side": side, "measure": measure,
                                  "mib_per_billion": round(slope, 1), "intercept_mib": round(intercept, 1),
                                  **{f"at_{b}b_gib": round((m + baseline) / 1024, 1) for b, m in at.items()},
                                  **{f"fits_{gb}gb_at_{b}b": (m + baseline) * MIB < gb * 1e9 * 0.9
                                     for gb in (32, 64) for b, m in at.items()}}), flush=True)


if __name__ == "__main__":
    main()
