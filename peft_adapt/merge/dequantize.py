"""The weights a quantized base computes with, rebuilt one tensor at a time from its checkpoint.

Which layers transformers quantizes, and with which settings, comes from transformers itself on an empty (meta)
model: the same `replace_with_bnb_linear` and the same list of layers kept in full precision. Each weight is then
cast to the dtype the loader loads it in and quantized and dequantized by the same bitsandbytes calls: bit-identical
to what the loaded layer computes with (tests compare them), without ever holding the model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.backbone import BaseSpec, bare_encoder, quantization_config, quantized_load_dtype
from ..models.shards import Checkpoint


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The fp32 weight a loaded bitsandbytes layer computes with, or None for a plain layer."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    if isinstance(module, bnb.nn.Linear4bit):
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError("4-bit weights were repacked by inference; dequantize from a freshly loaded model")
        return F.dequantize_4bit(module.weight.data, state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        weight = module.weight
        return F.int8_vectorwise_dequant(weight.data, weight.SCB).float()
    return None


class QuantizedLayout:
    """Which checkpoint weights a base loaded with `quantization` holds quantized, and their dequantized values (an
    empty model: no memory)."""

    def __init__(self, folder: Path, quantization: str, trust_remote_code: bool = False,
                 architecture: str = "causal_lm"):
        """`architecture`: the model the base was loaded as: causal_lm, seq2seq or encoder (the bare encoder)."""
        import bitsandbytes as bnb
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear
        from transformers.pytorch_utils import Conv1D
        from transformers.quantizers.base import get_keys_to_not_convert

        self.params: dict[str, dict] = {}  # checkpoint weight name -> the bitsandbytes parameter's settings
        self.int8 = quantization == "int8"
        self.loaded_dtype = quantized_load_dtype(Path(folder))  # what load_backbone quantizes from
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            if architecture == "encoder":
                empty = bare_encoder(config)
            else:
                built = AutoModelForSeq2SeqLM if architecture == "seq2seq" else AutoModelForCausalLM
                empty = built.from_config(config, trust_remote_code=trust_remote_code)
        # the checkpoint's names of the empty model's weights: a bare encoder (BertModel) read from a checkpoint
        # of a model with a head (BertForMaskedLM) finds its weights under the head model's prefix (`bert.`)
        names = [n for n, _ in empty.named_parameters()]
        checkpoint = Checkpoint(Path(folder))
        self.prefix = "" if architecture != "encoder" or all(n in checkpoint for n in names) else \
            f"{empty.base_model_prefix}."
        # Conv1D (GPT-2) stores its weight [in, out]: the loader transposes it before quantizing
        self.transposed = {self.prefix + n for n, module in empty.named_modules() if isinstance(module, Conv1D)}
        if quantization == "none":
            return
        spec = BaseSpec(model=str(folder), quantization=quantization, device="cpu")
        # kept unquantized as transformers keeps them: its list, and the model's own fp32 modules (T5's `wo`)
        skip = get_keys_to_not_convert(empty) + list(getattr(empty, "_keep_in_fp32_modules", None) or [])
        replace_with_bnb_linear(empty, skip, quantization_config(spec, torch.float32))
        for name, module in empty.named_modules():
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                settings = dict(module.weight.__dict__)
                settings.pop("SCB", None)
                self.params[f"{self.prefix}{name}.weight"] = settings

    def __contains__(self, key: str) -> bool:
        return key in self.params

    def dequantize(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (as stored in the checkpoint) quantized as the loader does and dequantized, in the dtype the loaded
        layer dequantizes to (the load dtype)."""
        if key.removesuffix(".weight") in self.transposed:  # quantized [out, in], as the loader does; returned as stored
            return self.dequantize_linear(key, weight.T.contiguous()).T.contiguous()
        return self.dequantize_linear(key, weight)

    def dequantize_linear(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """A weight stored [out, in], quantized and dequantized."""
        import bitsandbytes as bnb
        import bitsandbytes.functional as F

        weight = weight.to(self.loaded_dtype)
        if self.int8:
            param = bnb.nn.Int8Params(weight, requires_grad=False, **self.params[key]).to("cpu")
            return F.int8_vectorwise_dequant(param.data, param.SCB)
        param = bnb.nn.Params4bit(weight, requires_grad=False, **self.params[key]).to("cpu")
        return F.dequantize_4bit(param.data, param.quant_state)
