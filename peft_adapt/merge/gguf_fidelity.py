"""A GGUF export checked by llama.cpp itself (through llama-cpp-python): its next-token logits on probe text against
the adapter as the runtime serves it, beside the noise floor (llama.cpp running the base as training saw it, in f32,
against the base as served), and whether llama.cpp's tokenizer splits the probe text as the model's own does.

llama.cpp runs with an f32 KV cache here (its default is f16, which rounds every key and value): the report is
about the exported weights, not llama.cpp's cache settings.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .fidelity import _probe_texts, compare_logits, fidelity_warnings, probe_token_ids, served_logits

F32 = 0  # GGML_TYPE_F32, for llama.cpp's KV cache


def llama_cpp_logits(model: Path, blocks: torch.Tensor, lora: Path | None = None) -> torch.Tensor:
    """[blocks, tokens, vocab] logits of llama.cpp running `model` (with `lora` applied at scale 1) on each row of
    `blocks` from an empty cache."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=blocks.shape[1],
                n_batch=blocks.shape[1], n_ubatch=blocks.shape[1], logits_all=True, type_k=F32, type_v=F32,
                n_threads=_threads(), verbose=False)
    try:
        rows = []
        for block in blocks.tolist():
            llm.reset()
            llm.eval(block)
            rows.append(torch.from_numpy(llm.scores[: len(block)].copy()))
        return torch.stack(rows)
    finally:
        llm.close()


def llama_cpp_tokenization(model: Path, tokenizer, texts: list[str]) -> dict:
    """The share of texts (and of their tokens) that llama.cpp's tokenizer splits as the model's own tokenizer does
    (no BOS on either side)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        same_texts, same_tokens, tokens = 0, 0, 0
        for text in texts:
            ours = tokenizer(text, add_special_tokens=False)["input_ids"]
            theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            same_texts += ours == theirs
            same_tokens += sum(a == b for a, b in zip(ours, theirs))
            tokens += max(len(ours), len(theirs))
    finally:
        llm.close()
    return {"texts": len(texts), "texts_tokenized_alike": same_texts / max(len(texts), 1),
            "token_agreement": same_tokens / max(tokens, 1)}


def _threads() -> int:
    return max(1, int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()))


def gguf_logits_fidelity(entry, tokenizer, probe, probe_tokens: int, floor_base: Path,
                         runs: dict[str, tuple[Path, Path | None]], outtype: str, unjudged: str | None = None) -> dict:
    """Each of `runs` ({name: (model file, LoRA file or None)}) run by llama.cpp against the adapter as served;
    `floor_base`: the base as training saw it, in f32 (the noise floor's reference). `unjudged`: a run reported but
    not warned about (the user's own GGUF base, quantized its own way)."""
    manifest = entry.manifest
    probes = probe_token_ids(tokenizer, manifest, probe, probe_tokens)
    unmerged, base_served = served_logits(entry, probes)  # the runtime is gone before llama.cpp loads
    floor = compare_logits(llama_cpp_logits(floor_base, probes), base_served)
    scores = {name: compare_logits(llama_cpp_logits(model, probes, lora), unmerged)
              for name, (model, lora) in runs.items()}
    judged = {name: score for name, score in scores.items() if name != unjudged}
    report = {"warnings": fidelity_warnings(judged, floor, outtype, quantization=manifest.quantization),
            "probe_tokens": int(probes.numel()),
            "against": f"the unmerged model: {manifest.base_model} in {manifest.quantization} + the adapter, as served",
            "run_by": "llama.cpp (llama-cpp-python), f32 KV cache",
            "variants": scores,
            "noise_floor": floor | {"what": f"llama.cpp running {manifest.base_model} as training saw it (dequantized, "
                                            f"f32) against the base in {manifest.quantization} as served"},
            "tokenization": llama_cpp_tokenization(floor_base, tokenizer, _probe_texts(manifest, probe)[:64])}
    if unjudged is not None:  # how far that base alone is from the base as served: the yardstick for its run
        source = runs[unjudged][0]
        report["source_base"] = compare_logits(llama_cpp_logits(source, probes), base_served) | {
            "what": f"llama.cpp running {source.name} alone against the base in {manifest.quantization} as served"}
    return report
