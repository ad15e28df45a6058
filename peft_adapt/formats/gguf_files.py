"""GGUF files for llama.cpp: a model, or a LoRA adapter for llama.cpp's `--lora`, written with the `gguf` package
(llama.cpp's own writer, tensor-name maps, vocab readers and quantizers).

What the package does not hold is written here: which transformers architectures map to which llama.cpp one, the
row order llama.cpp's rotary embedding expects of Q and K (transformers rotates the two halves of a head, llama.cpp
interleaved pairs: convert_hf_to_gguf.py permutes the rows, and so does this), and the streaming: tensor infos are
declared first and the data written one tensor at a time, so memory stays that of one tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserInputError
from ..models.builtin_models import BUILTIN_MODELS, installed_weights_file

# transformers model_type -> llama.cpp architecture; Mistral's checkpoints are Llama's layout (llama.cpp converts
# MistralForCausalLM as `llama` too)
ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA"}
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ROPE_TYPES = ("default", "linear")  # the rope scalings written as metadata alone (llama3/yarn need more: refused)


def _gguf():
    import gguf

    return gguf


def gguf_architecture(config) -> str:
    """llama.cpp's architecture name for a transformers config, or a refusal naming those that are written."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserInputError(f"GGUF export writes {', '.join(sorted(ARCHITECTURES))} models (llama.cpp's `llama` "
                             f"architecture); this base is a {model_type!r} model. Export it as safetensors (the "
                             f"default --format) and serve it with transformers or vLLM")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise UserInputError(f"this base uses {rope['rope_type']!r} rope scaling, which GGUF export does not write yet "
                             f"(it writes {', '.join(ROPE_TYPES)}); export as safetensors instead")
    return _gguf().MODEL_ARCH_NAMES[getattr(_gguf().MODEL_ARCH, ARCHITECTURES[model_type])]


def _rope(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


class GgufLayout:
    """Names and row order of a transformers causal LM's tensors in llama.cpp's file."""

    def __init__(self, config):
        gguf = _gguf()
        self.architecture = gguf_architecture(config)
        arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[config.model_type])
        self.names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads

    def name(self, key: str) -> str | None:
        """llama.cpp's name for checkpoint key `key` (`model.layers.0.self_attn.q_proj.weight` ->
        `blk.0.attn_q.weight`), None when llama.cpp has no such tensor."""
        return self.names.get_name(key, try_suffixes=(".weight", ".bias"))

    def rows_permuted(self, key: str) -> int | None:
        """The head count whose rows are reordered for llama.cpp's rotary embedding (Q: heads, K: KV heads)."""
        if ".q_proj." in key:
            return self.heads
        if ".k_proj." in key:
            return self.kv_heads
        return None

    def to_gguf(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """A weight (or a LoRA B, whose rows are the weight's) in llama.cpp's row order."""
        heads = self.rows_permuted(key)
        if heads is None:
            return tensor
        rows = tensor.shape[0]
        return (tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:]).swapaxes(1, 2)
                .reshape(tensor.shape))


def tensor_type(outtype: str, shape: tuple[int, ...]):
    """The GGML type a tensor is stored in: norms and other 1-D tensors stay f32 (llama.cpp computes them so);
    q8_0 quantizes rows in blocks of 32 and falls back to f16 for a row length that is not a multiple of 32."""
    types = _gguf().GGMLQuantizationType
    if len(shape) < 2 or outtype == "f32":
        return types.F32
    if outtype == "q8_0":
        return types.Q8_0 if shape[-1] % 32 == 0 else types.F16
    return {"f16": types.F16, "bf16": types.BF16}[outtype]


def file_type(outtype: str) -> int:
    kinds = _gguf().LlamaFileType
    return {"f32": kinds.ALL_F32, "f16": kinds.MOSTLY_F16, "bf16": kinds.MOSTLY_BF16,
            "q8_0": kinds.MOSTLY_Q8_0}[outtype]


def encoded(tensor: torch.Tensor, qtype) -> np.ndarray:
    """`tensor` as the bytes (or floats) GGUF stores for `qtype`."""
    data = tensor.detach().float().contiguous().numpy()
    return _gguf().quants.quantize(data, qtype)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    gguf = _gguf()
    return int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))


class StreamingGguf:
    """A GGUF file written one tensor at a time: `plan` every tensor, add metadata to `.writer`, `start`, then
    `write` the tensors in planned order and `close`."""

    def __init__(self, path: Path, architecture: str):
        gguf = _gguf()
        self.path = Path(path)
        self.writer = gguf.GGUFWriter(str(self.path), architecture)
        self.planned: list[tuple[str, object]] = []

    def plan(self, name: str, shape: tuple[int, ...], qtype) -> None:
        self.writer.add_tensor_info(name, tuple(shape), np.dtype(np.float32), _nbytes(tuple(shape), qtype), qtype)
        self.planned.append((name, qtype))

    def start(self) -> None:
        self.writer.write_header_to_file(self.path)
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()
        self.written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, qtype = self.planned[self.written]
        if name != expected:  # the header already says where each tensor lies
            raise RuntimeError(f"GGUF tensors out of order: {name!r} written where {expected!r} was planned")
        self.writer.write_tensor_data(encoded(tensor, qtype))
        self.written += 1

    def close(self) -> None:
        if self.written != len(self.planned):
            raise RuntimeError(f"GGUF file {self.path}: {self.written} of {len(self.planned)} tensors written")
        self.writer.close()


def add_model_metadata(writer, config, name: str, outtype: str) -> None:
    """llama.cpp's hyperparameters for a Llama-layout model."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_type("model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(_gguf().RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_file_type(file_type(outtype))
    writer.add_quantization_version(_gguf().GGML_QUANT_VERSION)


def add_lora_metadata(writer, name: str) -> None:
    """A LoRA adapter's header. Each module's peft scaling (alpha / r, or per-module patterns) is already in its B,
    so alpha is 0: llama.cpp then applies B·A at the user's `--lora-scaled` scale alone."""
    writer.add_name(name)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 0.0)


def add_tokenizer(writer, folder: Path, tokenizer, vocab_size: int, source_gguf: Path | None) -> list[str]:
    """The tokenizer's metadata: copied field by field from the GGUF the base came from where there is one (its
    pre-tokenizer name and token types as llama.cpp wrote them), else read from the folder with the `gguf` package's
    vocab readers. Returns warnings."""
    if source_gguf is not None:
        _copy_tokenizer_fields(writer, source_gguf)
        return []
    gguf = _gguf()
    try:
        vocab, model = gguf.vocab.BpeVocab(folder), "gpt2"
    except FileNotFoundError:
        try:
            vocab, model = gguf.vocab.LlamaHfVocab(folder), "llama"
        except (FileNotFoundError, TypeError) as error:
            raise UserInputError(f"the tokenizer in {folder} is neither a byte-level BPE nor a Llama SentencePiece "
                                 f"tokenizer ({error}); GGUF export writes those two") from None
    tokens, scores, types = [], [], []
    special = set(tokenizer.all_special_ids)
    added = {i for i in tokenizer.get_added_vocab().values()}
    for i, (text, score, kind) in enumerate(vocab.all_tokens()):
        if i in special:
            kind = gguf.TokenType.CONTROL
        elif i in added and kind == gguf.TokenType.NORMAL:
            kind = gguf.TokenType.USER_DEFINED
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for i in range(len(tokens), vocab_size):  # embedding rows past the tokenizer's vocabulary, as llama.cpp pads
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    warnings = []
    writer.add_tokenizer_model(model)
    if model == "gpt2":
        pre = _bpe_pre_tokenizer(folder)
        if pre == "default":
            warnings.append("llama.cpp has no name for this tokenizer's pre-tokenizer; it splits text with its "
                            "default rules, which can tokenize some text differently: tokenization agreement is "
                            "measured in fidelity.json")
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    specials = gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=len(tokens))
    if specials.chat_template is None and getattr(tokenizer, "chat_template", None):
        specials.chat_template = tokenizer.chat_template
    specials.add_to_gguf(writer, quiet=True)
    return warnings


def _bpe_pre_tokenizer(folder: Path) -> str:
    """`gpt-2` where the tokenizer splits words as GPT-2 does (a ByteLevel pre-tokenizer with its regex), else
    llama.cpp's `default`."""
    import json

    pre = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    return "gpt-2" if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) else "default"


def _copy_tokenizer_fields(writer, source: Path) -> None:
    gguf = _gguf()
    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)


def gguf_source(base_model: str) -> Path | None:
    """The GGUF file a base was converted from (a built-in shipped as GGUF, or a `.gguf` path), if any."""
    if base_model in BUILTIN_MODELS:
        weights = installed_weights_file(BUILTIN_MODELS[base_model])
        return weights if weights.suffix == ".gguf" else None
    path = Path(base_model).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None
