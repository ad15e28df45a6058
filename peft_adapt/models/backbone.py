"""Load a base model: resolve its name, quantize it with bitsandbytes, attach the task's head.

A name is a local folder, a built-in alias (see `builtin_models`), or a Hugging Face hub id.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserInputError
from .fingerprint import base_fingerprint
from .half_storage import keep_half_storage
from .heads import (
    CRFTokenClassifier,
    EncoderWithHead,
    MaskedLanguageModel,
    SequenceClassifier,
    TokenClassifier,
    default_pooling,
)
from .memory import tensors_in_own_mappings
from .model_files import QUANTIZATIONS, BaseSpec, Quantization, resolve_model_path  # noqa: F401 (re-exported)
from .shards import Checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# bitsandbytes casts int8 inputs to fp16 on every call and says so each time
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


@dataclass
class Backbone:
    model: torch.nn.Module
    tokenizer: object
    spec: BaseSpec
    path: Path  # resolved local folder
    fingerprint: dict
    device: torch.device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserInputError(f"base.device: unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"base.device: {device!r} asked for, but CUDA is not available; use auto or cpu")
    return resolved


def resolve_compute_dtype(compute_dtype: str, device: torch.device) -> torch.dtype:
    if compute_dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[compute_dtype]


def quantization_config(spec: BaseSpec, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if spec.quantization == "none":
        return None
    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quantization,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=getattr(torch, spec.quant_storage),
    )


def load_backbone(
    spec: BaseSpec,
    task: str = "causal_lm",
    num_labels: int | None = None,
    pooling: str = "auto",
    crf_tags: list[str] | None = None,
) -> Backbone:
    """Load the base for `task`, quantized as `spec` says: `causal_lm`, `seq2seq` (an encoder-decoder with its LM
    head), `classification` (encoder + a fresh head pooling as `pooling` says) or `encoder` (the bare encoder, for
    serving heads of its own)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(spec.model, spec.allow_pickle)
    device = resolve_device(spec.device)
    compute_dtype = resolve_compute_dtype(spec.compute_dtype, device)
    quant = quantization_config(spec, compute_dtype)
    # Weights that stay unquantized compute in fp32 for stable training, except an unquantized base with an explicit
    # compute dtype, which loads in that dtype. A quantized base loads in its checkpoint's dtype (half_storage.py).
    dtype = compute_dtype if (quant is None and spec.compute_dtype != "auto") else torch.float32
    if quant is not None:
        dtype = quantized_load_dtype(path)
    kwargs = dict(
        dtype=dtype,
        quantization_config=quant,
        device_map={"": device} if quant is not None else None,
        trust_remote_code=spec.trust_remote_code,
        use_safetensors=not spec.allow_pickle,
    )
    config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if encoder_decoder != (task == "seq2seq"):
        raise UserInputError(
            f"{spec.model} is an encoder-decoder model ({config.model_type}): train it with task seq2seq (rows of "
            f"prompt + completion); {task} takes decoders and encoders" if encoder_decoder else
            f"task seq2seq takes an encoder-decoder model (T5, BART); {spec.model} ({config.model_type}) is not one: "
            f"train it with task causal_lm on prompt + completion rows")
    is_decoder = is_causal_decoder(config)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights newly initialized" is expected for heads
    hf_logging.disable_progress_bar()  # a bar per load is noise; training keeps its own bar
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with tensors_in_own_mappings():  # memory.py: loading's peak stays near what the model holds
        try:
            if task == "causal_lm":
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            elif task == "seq2seq":
                model = AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs)
            elif task in ("classification", "token_classification", "masked_lm", "encoder"):
                kwargs |= encoder_options(config)
                model = AutoModel.from_pretrained(path, **kwargs)
                if task not in ("encoder", "masked_lm") and not num_labels:
                    raise ValueError(f"{task} needs num_labels")
                if task == "classification":
                    chosen = default_pooling(path, is_decoder) if pooling == "auto" else pooling
                    model = SequenceClassifier(model, num_labels, chosen)
                elif task == "token_classification" and crf_tags:
                    model = CRFTokenClassifier(model, crf_tags)
                elif task == "token_classification":
                    model = TokenClassifier(model, num_labels, "mean")
                elif task == "masked_lm":
                    model = MaskedLanguageModel(model)
            else:
                raise UserInputError(f"task {task!r} is not known; use causal_lm, classification, "
                                     f"token_classification, masked_lm, seq2seq or encoder")
            if quant is None:
                model.to(device)
            else:
                keep_half_storage(model.encoder if isinstance(model, EncoderWithHead) else model)
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    if task == "masked_lm" and (is_decoder or tokenizer.mask_token_id is None):
        raise UserInputError(f"task masked_lm needs an encoder whose tokenizer has a mask token; {spec.model} is "
                             f"{'a decoder' if is_decoder else 'without one'}: train its domain adapter with task causal_lm")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Backbone(model, tokenizer, spec, path, base_fingerprint(path), device)


def encoder_options(config) -> dict:
    """What `AutoModel` takes to build the bare encoder the task heads sit on: no pooler where the class has one
    (our heads pool; an unused pooler would get LoRA too)."""
    from transformers import AutoModel

    encoder_cls = AutoModel._model_mapping[type(config)]
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(encoder_cls.__init__).parameters else {}


def bare_encoder(config):
    """The bare encoder of `config` as `load_backbone` builds it for the task heads (weights as the config says)."""
    from transformers import AutoModel

    return AutoModel.from_config(config, **encoder_options(config))


def quantized_load_dtype(path: Path) -> torch.dtype:
    """The dtype a quantized base's checkpoint is loaded in, before quantization: its own 16-bit dtype, else fp32.
    Export rebuilds the quantized weights from the same dtype (merge/dequantize.py): bitsandbytes' blockwise
    quantization of a bf16 tensor differs, in a few codes, from that of the same values in fp32."""
    try:
        saved = Checkpoint(path).float_dtype
    except UserInputError:  # a pickled checkpoint (allow_pickle): as before
        return torch.float32
    return saved if saved in (torch.bfloat16, torch.float16) else torch.float32


def is_causal_decoder(config) -> bool:
    """Whether the model reads left to right (its last token sees the whole text), decided from what transformers
    knows of the architecture rather than a list of names: a decoder config, or a type with a causal-LM head and
    neither a masked-LM head (BERT's family) nor an encoder-decoder head (T5, BART)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_decoder", False):
        return True
    kind = config.model_type
    return (kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and kind not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
            and not getattr(config, "is_encoder_decoder", False))


def disable_cpu_repacking(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking this model's 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, an eval-mode forward of `Linear4bit` repacks its weight into a layout
    only the inference kernel reads (2x faster there): a later backward fails, dequantization
    (merge, export) returns garbage, and bitsandbytes' inverse is lossy (absmax rounded to bf16).
    A model that will be trained or dequantized must never be repacked, so this is called right
    after loading; a model that has already been repacked is refused.
    """
    import bitsandbytes as bnb

    repacked = []
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = module.weight.quant_state
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                repacked.append(name)
    if repacked:
        raise RuntimeError(
            f"{len(repacked)} 4-bit layers (first: {repacked[0]}) were already repacked for CPU inference by "
            f"an eval-mode forward; they can no longer be trained through or dequantized exactly. Load the "
            f"model again and train or merge it before running any inference on it."
        )
