"""Fold an adapter into its base and save a standalone model that loads with `transformers` alone.

Any method that folds (its `fold`: LoRA adds its delta, (IA)3 scales rows or columns) folds here; the others are
refused with their reason. Folding into a 4-bit base and quantizing again rounds most of an adaptation away. So
the base is dequantized, the adapter folded in fp32, and the result saved in the chosen dtype. A QLoRA adapter was
trained against the dequantized 4-bit weights, so by default the delta is folded into exactly those
(`base_weights="dequantized"`), and the exported model computes what was trained; `"original"` folds
into the checkpoint's full-precision weights instead. Requantizing is an option, never the default.

The export streams: the checkpoint is read one tensor at a time and the output written one tensor at a time
(`shards`), so its memory is that of the largest tensor in fp32, whatever the model's size. `fidelity.json` says
how much of the adapter the saved weights keep, module by module (`weights`, bounded like the export), or, asked
for, how the whole exported model's logits agree with the unmerged one as served (`logits`: holds the model).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..errors import UserInputError
from ..formats import file_checksums, staged_folder, write_json
from ..methods import TABLE, AdapterWeights, method
from ..models.backbone import resolve_model_path
from ..models.memory import release_freed_memory, tensors_in_own_mappings
from ..models.shards import Checkpoint, ShardWriter, parse_size
from ..registry.transfer import check_export_target
from .dequantize import QuantizedLayout
from .exported_head import write_head
from .fidelity import WeightFidelity, head_fidelity, logits_fidelity, seq2seq_fidelity

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENCODER_TASKS = ("classification", "token_classification", "masked_lm")  # exported as the bare encoder (+ head)
FIDELITY = ("weights", "logits", "none")


class FoldedBase:
    """The weights of `base` with `weights` folded in (None: the base alone), read and folded one tensor at a time.
    `architecture`: the model the adapter's site paths are in: causal_lm, seq2seq, or encoder (the bare encoder the
    task heads sit on)."""

    def __init__(self, base: Path, weights: AdapterWeights | None, quantization: str, base_weights: str,
                 architecture: str = "causal_lm"):
        self.checkpoint = checkpoint = Checkpoint(base)
        self.layout = layout = QuantizedLayout(base, quantization if base_weights == "dequantized" else "none",
                                               architecture=architecture)
        self.sites = {layout.prefix + p: s for p, s in weights.sites.items()} if weights is not None else {}
        missing = sorted(p for p in self.sites if f"{p}.weight" not in checkpoint)
        if missing:
            raise UserInputError(f"the adapter adapts {missing[0]!r}, which the base {base} does not have")
        unnamed = sorted(k for k in layout.params if k not in checkpoint)
        if unnamed:  # transformers renames some checkpoints' keys as it loads; folding by name would miss those layers
            raise UserInputError(f"the base {base} names its weights otherwise than the model transformers builds "
                                 f"from it (no {unnamed[0]!r} in the checkpoint); export cannot map them: serve the "
                                 f"adapter instead")
        self.site_of = {f"{p}.{part}": p for p in self.sites for part in ("weight", "bias")
                        if f"{p}.{part}" in checkpoint}
        self.adapting = method(weights.method) if weights is not None else None

    def served(self, key: str) -> torch.Tensor:
        """The base's tensor as the model computes with it (bf16 -> fp32 is exact)."""
        tensor = self.checkpoint.read(key)
        return self.layout.dequantize(key, tensor) if key in self.layout else tensor

    def tensors(self, fidelity: WeightFidelity | None = None, saved=None):
        """(key, tensor) in checkpoint order: folded sites in fp32, the rest as served. With `fidelity`, each folded
        weight is measured against `saved(key, weight)`, the weight as the file will hold it."""
        folded = {}  # the site being written, until its weight and bias are out
        for key in self.checkpoint.tensors:
            path = self.site_of.get(key)
            if path is None:
                yield key, self.served(key)
                continue
            if path not in folded:
                state = {k: self.served(k).float() for k, p in self.site_of.items() if p == path}
                conv1d = path in self.layout.transposed  # GPT-2's Conv1D stores [in, out]: folded as [out, in]
                if conv1d:
                    state[f"{path}.weight"] = state[f"{path}.weight"].T
                before = state[f"{path}.weight"]
                self.adapting.fold(state, path, self.sites[path])
                if conv1d:
                    state[f"{path}.weight"] = state[f"{path}.weight"].T.contiguous()
                    before = before.T
                if fidelity is not None:
                    weight = state[f"{path}.weight"]
                    fidelity.add(path, before, weight, saved(f"{path}.weight", weight))
                folded[path] = state
            yield key, folded[path].pop(key)
            if not folded[path]:
                del folded[path]


def write_folded(base: Path, weights: AdapterWeights | None, quantization: str, base_weights: str, dtype: str,
                 target: Path, max_shard_size: str | int = "2GB", measure: bool = True,
                 architecture: str = "causal_lm") -> WeightFidelity:
    """Write the weights of `base` with `weights` folded in (None: the base alone) to `target` in `dtype`, one tensor
    at a time; returns what the saved dtype kept of the adapter, module by module."""
    source = FoldedBase(base, weights, quantization, base_weights, architecture)
    cast = DTYPES[dtype]

    def out_dtype(tensor_dtype: torch.dtype) -> torch.dtype:
        return cast if tensor_dtype.is_floating_point else tensor_dtype

    with tensors_in_own_mappings():  # memory.py: freed tensors go back to the system
        plan = [(key, info.shape, out_dtype(info.dtype)) for key, info in source.checkpoint.tensors.items()]
        writer = ShardWriter(target, plan, parse_size(max_shard_size))
        fidelity = WeightFidelity()
        for (key, tensor), (_, _, to) in zip(source.tensors(fidelity if measure else None,
                                                           lambda _, w: w.to(cast)), plan):
            writer.write(key, tensor.to(to))
            release_freed_memory()
        writer.close()
    return fidelity


def check_common_options(base_weights: str, fidelity: str) -> None:
    """The options both export formats take, refused before anything is read."""
    if base_weights not in ("dequantized", "original"):
        raise UserInputError(f"base weights {base_weights!r}: use dequantized or original")
    if fidelity not in FIDELITY:
        raise UserInputError(f"fidelity {fidelity!r}: use {', '.join(FIDELITY)}")


def exported_adapter(registry, ref: str):
    """(entry, manifest, its method) of the adapter `ref`, refused when it names a full model."""
    entry = registry.get(ref)
    if entry.manifest.method not in TABLE:
        raise UserInputError(f"{entry.ref} is a {entry.manifest.method} model, not an adapter; export folds adapters")
    return entry, entry.manifest, method(entry.manifest.method)


def full_precision_config(path, base_model: str):
    """The base's config, refused when the base is saved quantized: export folds into full-precision weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None):
        raise UserInputError(f"the base {base_model} is saved quantized; export folds into full-precision weights")
    return config


def export_model(registry, ref: str, out: str | Path, dtype: str = "bf16", base_weights: str = "dequantized",
                 requantize: str | None = None, probe: str | Path | None = None, probe_tokens: int = 1024,
                 max_shard_size: str = "2GB", fidelity: str = "weights") -> dict:
    """Fold adapter `ref` into its base, save a standalone model in `out` and report its fidelity (`fidelity`:
    weights, logits, or none: no fidelity.json)."""
    from transformers import AutoTokenizer

    if dtype not in DTYPES:
        raise UserInputError(f"dtype {dtype!r} is not known; use {', '.join(DTYPES)}")
    if requantize not in (None, "nf4", "int8"):
        raise UserInputError(f"requantize {requantize!r}: use nf4 or int8")
    parse_size(max_shard_size)  # a bad size is refused before the model is read
    check_common_options(base_weights, fidelity)
    started = time.perf_counter()
    entry, manifest, adapting = exported_adapter(registry, ref)
    if adapting.fold_reason is not None:
        raise UserInputError(f"{entry.ref} cannot be exported into base weights: {adapting.fold_reason}. "
                             f"Serve it with the runtime instead.")
    encoder = manifest.task in ENCODER_TASKS  # the bare encoder, with the adapter's head beside it
    architecture = "encoder" if encoder else manifest.task
    if architecture not in ("causal_lm", "seq2seq", "encoder"):
        raise UserInputError(f"{entry.ref} is a {manifest.task} adapter; export takes causal_lm, seq2seq, "
                             f"{', '.join(ENCODER_TASKS)} adapters")
    if requantize and architecture != "causal_lm":
        raise UserInputError(f"{entry.ref} is a {manifest.task} adapter; requantize applies to causal LM exports. "
                             f"Leave out --requantize")
    out = Path(out)
    check_export_target(out)
    base_model, trained_q = manifest.base_model, manifest.quantization
    path = resolve_model_path(base_model)
    config = full_precision_config(path, base_model)
    report = {"adapter": entry.ref, "base_model": base_model, "trained_quantization": trained_q,
              "base_weights": base_weights, "dtype": dtype, "requantize": requantize}
    with staged_folder(out) as staging, tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "fp" if requantize else staging
        target.mkdir(parents=True, exist_ok=True)
        weights = adapting.read(entry.path, strip_prefix="encoder." if encoder else "")
        kept = write_folded(path, weights, trained_q, base_weights, dtype, target, max_shard_size,
                            measure=fidelity == "weights", architecture=architecture)
        _save_config(config, target, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if encoder and tokenizer.pad_token is None:  # as the runtime pads a decoder classifier's rows
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(target)
        if encoder and weights.head:
            write_head(target, weights.head, manifest, entry.ref)
        elif not encoder:
            _generation_config(path, config).save_pretrained(target)
        report["export_seconds"] = time.perf_counter() - started
        if requantize:
            _requantize(target, staging, requantize, tokenizer, path, max_shard_size)
        if fidelity == "weights":
            report |= {"fidelity": "weights", **kept.report(dtype)}
        elif fidelity == "logits" and encoder:
            measured = time.perf_counter()
            report |= {"fidelity": "logits", **head_fidelity(entry, target, DTYPES[dtype], probe)}
            report["fidelity_seconds"] = time.perf_counter() - measured
        elif fidelity == "logits":
            measured = time.perf_counter()
            floor_base = Path(tmp) / "base"  # the base as training saw it, in fp32: the noise floor's reference
            floor_base.mkdir()
            write_folded(path, None, trained_q, base_weights, "fp32", floor_base, max_shard_size, measure=False,
                         architecture=architecture)
            _save_config(config, floor_base, "fp32")
            exported = {f"export_{dtype}": (target, DTYPES[dtype])}
            if requantize:
                exported[f"requantized_{requantize}"] = (staging, None)
            compare = seq2seq_fidelity if architecture == "seq2seq" else logits_fidelity
            report |= {"fidelity": "logits", **compare(entry, tokenizer, probe, probe_tokens, floor_base, exported, dtype)}
            report["fidelity_seconds"] = time.perf_counter() - measured
        report["seconds"] = time.perf_counter() - started
        if fidelity != "none":
            write_json(staging / "fidelity.json", report)
    return report


def _save_config(config, folder: Path, dtype: str) -> None:
    config.dtype = DTYPES[dtype]
    config.save_pretrained(folder)


def _requantize(folder: Path, out: Path, requantize: str, tokenizer, path: Path, max_shard_size: str) -> None:
    """The exported model loaded quantized and saved so (this holds the quantized model in memory)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = (BitsAndBytesConfig(load_in_8bit=True) if requantize == "int8" else
             BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu")
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    _generation_config(path, model.config).save_pretrained(out)


def _generation_config(path: Path, config):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return GenerationConfig.from_model_config(config)


def export_adapter_folder(registry, ref: str, out: str | Path, pad_rank: bool = False) -> list[str]:
    """An adapter folder that vanilla peft and vLLM load (methods that vLLM serves); returns warnings saying what
    to change, if anything."""
    entry = registry.get(ref)
    out = Path(out)
    check_export_target(out)
    adapting = method(entry.manifest.method) if entry.manifest.method in TABLE else None
    if adapting is None or not adapting.vllm_servable:
        raise UserInputError(f"{entry.ref} is a {entry.manifest.method} adapter; vLLM serves LoRA adapters")
    with staged_folder(out) as staging:
        warnings = adapting.vllm_folder(entry.path, staging, pad_rank)
        write_json(staging / "manifest.json", entry.manifest.dump() | {"files": file_checksums(staging)})
    return warnings
