"""QLoRA training throughput and peak memory: ours (`train_domain`, with and without liger where it applies)
against a plain peft + Trainer script, on the same base, data, seed and settings, interleaved, medians of 3.

The plain script is what a user writes by hand: BitsAndBytesConfig nf4, prepare_model_for_kbit_training,
get_peft_model (LoRA r16 on every linear layer), the text tokenized and packed into blocks with datasets,
Trainer. Both train the same number of steps on the same blocks; tokens/s counts trained tokens over the
training loop's wall time (model loading excluded on both sides; ours also scores one held-out row at the end,
inside its timed loop: against us). Peak memory is CUDA's allocator peak over each run, model loading included
(on the CPU there is no per-run figure: the process's peak only grows, so none is printed).

    python benchmarks/training.py                                  # smollm2-135m nf4, 12 steps x 3 repeats
    python benchmarks/training.py --model PATH --steps 50          # on a GPU: a larger Llama-family base
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def texts(limit: int) -> list[str]:
    from peft_adapt.training.recipe import data_root

    path = data_root() / "domain_text" / "news.jsonl"
    return [json.loads(line)["text"] for line in open(path, encoding="utf-8")][:limit]


def plain_peft_trainer(model: str, rows: list[str], args, out: Path) -> dict:
    """The hand-written baseline."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from peft_adapt.models.backbone import resolve_model_path

    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization,
                                                device_map={"": 0} if torch.cuda.is_available() else {"": "cpu"})
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    ids = [t for row in tokenizer(rows)["input_ids"] for t in row + [tokenizer.eos_token_id]]
    blocks = [ids[i:i + args.max_length] for i in range(0, len(ids) - args.max_length + 1, args.max_length)]
    dataset = Dataset.from_dict({"input_ids": blocks})
    trainer = Trainer(
        model=model, train_dataset=dataset, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        args=TrainingArguments(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                               learning_rate=2e-4, seed=0, data_seed=0, logging_steps=args.steps, save_strategy="no",
                               report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
                               bf16=torch.cuda.is_available(), dataloader_num_workers=0),
    )
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    return {"tokens_per_s": args.steps * args.batch_size * args.max_length / wall, "seconds": wall,
            "peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}


def ours(model: str, data_file: Path, args, out: Path, kernels: str) -> dict:
    import torch

    from peft_adapt import parse_recipe, train_domain

    recipe = parse_recipe({
        "name": "bench", "base": {"model": model, "quantization": "nf4"},
        "task": {"type": "causal_lm", "max_length": args.max_length, "packing": True},
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": 2e-4, "seed": 0,
                     "warmup_steps": 0, "scheduler": "linear", "kernels": kernels, "checkpoint_steps": None,
                     "max_eval_rows": 1},
        "domains": {"news": {"train": str(data_file)}},
    })
    result = train_domain(recipe, "news", out)
    tokens = args.steps * args.batch_size * args.max_length
    return {"tokens_per_s": tokens / result.metrics["train_seconds"], "seconds": result.metrics["train_seconds"],
            "peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}


def main() -> None:
    import torch

    from peft_adapt.training.threads import configure_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = configure_threads("auto")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({threads} threads)"
    variants = ["plain", "ours"] + (["ours_liger"] if torch.cuda.is_available() else [])
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as work:
        rows = texts(400)
        data_file = Path(work) / "news.jsonl"
        data_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
        for repeat in range(args.repeats):  # interleaved: each repeat runs every variant once, in turn
            for variant in variants:
                out = Path(work) / f"{variant}-{repeat}"
                if torch.cuda.is_available():  # each run's own peak, loading included, never an earlier run's
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                if variant == "plain":
                    result = plain_peft_trainer(args.model, rows, args, out)
                else:
                    result = ours(args.model, data_file, args, out, "liger" if variant == "ours_liger" else "none")
                runs[variant].append(result)
                print(json.dumps({"name": "training_run", "variant": variant, "repeat": repeat, **result,
                                  "device": device}), flush=True)
    plain = statistics.median(r["tokens_per_s"] for r in runs["plain"])
    for variant in variants[1:]:
        value = statistics.median(r["tokens_per_s"] for r in runs[variant])
        peaks = [r["peak_bytes"] for r in runs[variant] if r["peak_bytes"] is not None]
        plain_peaks = [r["peak_bytes"] for r in runs["plain"] if r["peak_bytes"] is not None]
        print(json.dumps({"name": "training_tokens_per_s_ratio", "variant": variant, "value": value, "baseline": plain,
                          "ratio": value / plain, "peak_memory_ratio": (statistics.median(peaks) /
                                                                      statistics.median(plain_peaks)) if peaks else None,
                          "baseline_is": "plain peft + Trainer (nf4, LoRA r16 all-linear, same blocks and settings)",
                          "model": args.model, "steps": args.steps, "batch_size": args.batch_size,
                          "max_length": args.max_length, "repeats": args.repeats, "device": device}), flush=True)


if __name__ == "__main__":
    main()
