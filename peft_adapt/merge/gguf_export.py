"""Export for llama.cpp (and Ollama, LM Studio on top of it): the folded model as one GGUF file, or a LoRA adapter as
a GGUF LoRA for llama.cpp's `--lora` (with, asked for, the base it was trained on as GGUF beside it).

The fold follows the safetensors export's rules (`export.py`): by default into the dequantized weights the adapter
was trained on. The output is a folder: the `.gguf` file(s), a `Modelfile` for Ollama, `fidelity.json` and a README
with the commands that run it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..errors import UserInputError
from ..formats import staged_folder, write_json
from ..formats.gguf_files import (
    OUTTYPES,
    GgufLayout,
    StreamingGguf,
    add_lora_metadata,
    add_model_metadata,
    add_tokenizer,
    encoded,
    gguf_architecture,
    gguf_source,
    tensor_type,
)
from ..methods import method
from ..models.backbone import resolve_model_path
from ..registry.transfer import check_export_target
from .export import FoldedBase, check_common_options, exported_adapter, full_precision_config
from .fidelity import WeightFidelity

MODEL_FILE, ADAPTER_FILE, BASE_FILE = "model.gguf", "adapter.gguf", "base.gguf"


def _saved_as(outtype: str):
    """A folded weight as the GGUF file will hold it (quantized and read back), for the weight fidelity."""
    import gguf

    def saved(_key: str, weight: torch.Tensor) -> torch.Tensor:
        qtype = tensor_type(outtype, tuple(weight.shape))
        return torch.from_numpy(gguf.quants.dequantize(encoded(weight, qtype), qtype).copy()).reshape(weight.shape)

    return saved


def write_gguf_model(path: Path, source: FoldedBase, config, folder: Path, tokenizer, outtype: str, name: str,
                     source_gguf: Path | None, fidelity: WeightFidelity | None = None) -> list[str]:
    """`source`'s tensors (a base with an adapter folded in, or none) as a llama.cpp model file; returns warnings."""
    layout = GgufLayout(config)
    out = StreamingGguf(path, layout.architecture)
    names = {}
    for key, info in source.checkpoint.tensors.items():
        names[key] = layout.name(key)
        if names[key] is None:
            raise UserInputError(f"the base's tensor {key!r} has no place in llama.cpp's {layout.architecture} model; "
                                 f"export as safetensors instead")
        out.plan(names[key], tuple(info.shape), tensor_type(outtype, tuple(info.shape)))
    add_model_metadata(out.writer, config, name, outtype)
    warnings = add_tokenizer(out.writer, folder, tokenizer, config.vocab_size, source_gguf)
    out.start()
    for key, tensor in source.tensors(fidelity, _saved_as(outtype)):
        out.write(names[key], layout.to_gguf(key, tensor))
    out.close()
    return warnings


def write_gguf_lora(path: Path, weights, config, outtype: str, name: str) -> None:
    """A LoRA adapter as llama.cpp's GGUF LoRA: per module `<tensor>.lora_a` [r, in] and `.lora_b` [out, r] (peft's
    scaling folded into B; B's rows in llama.cpp's order for Q and K, as the base's are)."""
    layout = GgufLayout(config)
    out = StreamingGguf(path, layout.architecture)
    tensors = []
    adapting = method(weights.method)
    for site, factors in sorted(weights.sites.items()):
        a, b = adapting.factors(factors)
        key = f"{site}.weight"
        target = layout.name(key)
        if target is None or not target.startswith("blk."):
            raise UserInputError(f"the adapter adapts {site!r}, which llama.cpp's LoRA loader does not adapt (it "
                                 f"adapts the blocks' linear layers); export the merged model instead (without "
                                 f"--adapter-only)")
        tensors += [(f"{target}.lora_a", a), (f"{target}.lora_b", layout.to_gguf(key, b))]
    kind = "f16" if outtype == "q8_0" else outtype  # factors of a few rows or columns: not quantized
    for tensor_name, tensor in tensors:
        out.plan(tensor_name, tuple(tensor.shape), tensor_type(kind, tuple(tensor.shape)))
    add_lora_metadata(out.writer, name)
    out.start()
    for tensor_name, tensor in tensors:
        out.write(tensor_name, tensor)
    out.close()


def export_gguf(registry, ref: str, out: str | Path, outtype: str = "f32", base_weights: str = "dequantized",
                adapter_only: bool = False, with_base: bool = False, probe: str | Path | None = None,
                probe_tokens: int = 1024, fidelity: str = "weights") -> dict:
    """Export adapter `ref` for llama.cpp into the new folder `out`: `model.gguf` (the adapter folded in), or with
    `adapter_only` `adapter.gguf` (+ `base.gguf` with `with_base`). `fidelity`: weights (what the saved tensors keep
    of the adapter), logits (llama.cpp itself run on probe text against the adapter as served; needs
    llama-cpp-python) or none."""
    from transformers import AutoTokenizer

    if outtype not in OUTTYPES:
        raise UserInputError(f"outtype {outtype!r}: use {', '.join(OUTTYPES)}")
    check_common_options(base_weights, fidelity)
    if with_base and not adapter_only:
        raise UserInputError("--with-base goes with --adapter-only (the merged model.gguf holds its base already)")
    started = time.perf_counter()
    entry, manifest, adapting = exported_adapter(registry, ref)
    if manifest.task != "causal_lm":
        raise UserInputError(f"{entry.ref} is a {manifest.task} adapter; llama.cpp runs causal language models: "
                             f"export it as safetensors (the default --format)")
    if adapter_only and not adapting.low_rank:
        raise UserInputError(f"{entry.ref} is a {manifest.method} adapter; llama.cpp's adapters (--lora) are LoRA. "
                             + ("Export the merged model instead (without --adapter-only)"
                                if adapting.fold_reason is None else "Serve it with the runtime instead"))
    if not adapter_only and adapting.fold_reason is not None:
        raise UserInputError(f"{entry.ref} cannot be exported into base weights: {adapting.fold_reason}. "
                             f"Serve it with the runtime instead.")
    if fidelity == "logits":
        _require_llama_cpp()
    out = Path(out)
    check_export_target(out)
    path = resolve_model_path(manifest.base_model)
    config = full_precision_config(path, manifest.base_model)
    gguf_architecture(config)  # a refusal before anything is read
    tokenizer = AutoTokenizer.from_pretrained(path)
    source_gguf = gguf_source(manifest.base_model)
    weights = adapting.read(entry.path)
    name = entry.ref.replace("@", "-")
    report = {"adapter": entry.ref, "base_model": manifest.base_model, "trained_quantization": manifest.quantization,
              "base_weights": base_weights, "format": "gguf", "outtype": outtype,
              "files": [ADAPTER_FILE] + ([BASE_FILE] if with_base else []) if adapter_only else [MODEL_FILE]}
    kept = WeightFidelity()
    measure = kept if fidelity == "weights" and not adapter_only else None
    with staged_folder(out) as staging:
        warnings = []
        if adapter_only:
            write_gguf_lora(staging / ADAPTER_FILE, weights, config, outtype, name)
            if with_base:
                base = FoldedBase(path, None, manifest.quantization, base_weights)
                warnings += write_gguf_model(staging / BASE_FILE, base, config, path, tokenizer, outtype,
                                             f"{manifest.base_model} as {entry.ref} was trained on", source_gguf)
        else:
            folded = FoldedBase(path, weights, manifest.quantization, base_weights)
            warnings += write_gguf_model(staging / MODEL_FILE, folded, config, path, tokenizer, outtype, name,
                                         source_gguf, measure)
        report["export_seconds"] = time.perf_counter() - started
        if measure is not None:
            report |= {"fidelity": "weights", **kept.report(outtype)}
        elif fidelity == "logits":
            measured = time.perf_counter()
            report |= {"fidelity": "logits", **_run_by_llama_cpp(entry, tokenizer, staging, adapter_only, with_base,
                                                                 outtype, base_weights, probe, probe_tokens, path,
                                                                 config, source_gguf)}
            report["fidelity_seconds"] = time.perf_counter() - measured
        report["warnings"] = warnings + report.get("warnings", [])
        report["seconds"] = time.perf_counter() - started
        (staging / "Modelfile").write_text(_modelfile(adapter_only, with_base, source_gguf))
        (staging / "README.md").write_text(_readme(entry.ref, adapter_only, with_base, source_gguf))
        if fidelity != "none":
            write_json(staging / "fidelity.json", report)
    return report


def _run_by_llama_cpp(entry, tokenizer, folder: Path, adapter_only: bool, with_base: bool, outtype: str,
                      base_weights: str, probe, probe_tokens: int, base_path: Path, config,
                      source_gguf: Path | None) -> dict:
    """The exported file(s) in `folder` run by llama.cpp against the adapter as served (`gguf_fidelity`)."""
    from .gguf_fidelity import gguf_logits_fidelity  # lazy: llama-cpp-python is an optional extra

    manifest = entry.manifest
    with tempfile.TemporaryDirectory() as tmp:
        # the base as training saw it, in f32: the noise floor's reference (a temporary file of 4 bytes per
        # parameter, unless base.gguf is that file already)
        floor_base = Path(tmp) / "base-f32.gguf"
        if adapter_only and with_base and outtype == "f32":
            floor_base = folder / BASE_FILE
        else:
            write_gguf_model(floor_base, FoldedBase(base_path, None, manifest.quantization, base_weights), config,
                             base_path, tokenizer, "f32", "noise floor", source_gguf)
        runs, unjudged = {}, None
        if not adapter_only:
            runs[f"{MODEL_FILE} ({outtype})"] = (folder / MODEL_FILE, None)
        else:
            adapter = folder / ADAPTER_FILE
            if with_base and outtype != "f32":
                runs[f"{BASE_FILE} ({outtype}) + {ADAPTER_FILE}"] = (folder / BASE_FILE, adapter)
            runs[f"base f32 + {ADAPTER_FILE}"] = (floor_base, adapter)
            if source_gguf is not None:  # the GGUF the base came from, as a user of llama.cpp has it
                unjudged = f"{source_gguf.name} (the GGUF the base came from) + {ADAPTER_FILE}"
                runs[unjudged] = (source_gguf, adapter)
        return gguf_logits_fidelity(entry, tokenizer, probe, probe_tokens, floor_base, runs, outtype, unjudged)


def _require_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise UserInputError("--fidelity logits runs the export in llama.cpp itself, through llama-cpp-python: "
                             "pip install 'peft-adapt[llama-cpp]' (it compiles llama.cpp), or use --fidelity "
                             "weights") from None


def _base_line(with_base: bool, source_gguf: Path | None) -> str:
    if with_base:
        return f"./{BASE_FILE}"
    return str(source_gguf) if source_gguf is not None else "/path/to/the-base-model.gguf"


def _modelfile(adapter_only: bool, with_base: bool, source_gguf: Path | None) -> str:
    if not adapter_only:
        return f"FROM ./{MODEL_FILE}\n"
    return f"FROM {_base_line(with_base, source_gguf)}\nADAPTER ./{ADAPTER_FILE}\n"


def _readme(ref: str, adapter_only: bool, with_base: bool, source_gguf: Path | None) -> str:
    if adapter_only:
        base = _base_line(with_base, source_gguf)
        run = (f"llama-cli -m {base} --lora {ADAPTER_FILE} -p 'Hello'\n"
               f"llama-server -m {base} --lora {ADAPTER_FILE} --port 8080   # per-request scale: POST /lora-adapters")
        what = (f"`{ADAPTER_FILE}` is the LoRA adapter {ref} for llama.cpp's `--lora`"
                + (f"; `{BASE_FILE}` is the base as the adapter was trained on it" if with_base else
                   "; run it on the base it was trained on (a GGUF of the same model)"))
    else:
        run = (f"llama-cli -m {MODEL_FILE} -p 'Hello'\n"
               f"llama-server -m {MODEL_FILE} --port 8080")
        what = f"`{MODEL_FILE}` is {ref} folded into its base, a standalone llama.cpp model"
    return (f"# {ref} for llama.cpp\n\n{what}.\n\n```sh\n{run}\n```\n\nWith Ollama (the `Modelfile` beside this "
            f"file):\n\n```sh\nollama create {ref.split('@')[0]} -f Modelfile\nollama run {ref.split('@')[0]}\n```\n\n"
            f"`fidelity.json` says how closely it computes what the adapter computes as served.\n")
