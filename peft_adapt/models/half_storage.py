"""A quantized base's unquantized embeddings and LM head kept in the checkpoint's 16-bit dtype, computing in fp32.

A quantized base used to load everything it does not quantize in fp32: on a 1.1B Llama the embeddings and the head
were 0.75 GiB of its 1.21 GiB of tensors, and upcasting the checkpoint on the way in spiked loading by the model's
whole fp32 size (measured: peak 2.9x the bf16 load's). Loading in the checkpoint's own dtype and upcasting what is
used, when it is used, costs nothing in precision (a bf16 value is exact in fp32) and keeps the activations, the
norms and everything trained in fp32 as before: the looked-up embedding rows are upcast, and the head multiplies in
fp32 a slice of its rows at a time, so no fp32 copy of it ever exists whole.
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_ROWS = 8192  # rows of the head upcast at a time: 8192 x 8192 x 4 bytes = 256 MiB on a 70B model


class HalfStoredLinear(nn.Linear):
    """An `nn.Linear` whose weight is stored in 16 bits and whose product is computed in fp32, a block of rows at a
    time (each output is one row's dot product, so the blocks give the full product's values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:
            return super().forward(x)
        blocks = []
        for start in range(0, self.weight.shape[0], HEAD_ROWS):
            rows = slice(start, start + HEAD_ROWS)
            bias = self.bias[rows].to(x.dtype) if self.bias is not None else None
            blocks.append(nn.functional.linear(x, self.weight[rows].to(x.dtype), bias))
        return torch.cat(blocks, dim=-1)


def _upcast_output(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def keep_half_storage(model: nn.Module) -> None:
    """After loading a quantized base: the embeddings and LM head stay in the checkpoint's dtype (computing in fp32),
    every other unquantized weight (norms, biases, position tables) goes to fp32, and each is copied out of the
    checkpoint's memory map. transformers leaves a tensor it did not convert as a view into the mapped file, and one
    such view keeps every page of the file that loading read resident: measured on a 0.31B base, 485 MB of the
    process's memory after loading was the mapped checkpoint."""
    import bitsandbytes as bnb

    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kept = {id(p) for m in (embeddings, head) if m is not None for p in m.parameters()}
    if embeddings.weight.dtype != torch.float32:
        embeddings.register_forward_hook(_upcast_output)
        if type(head) is nn.Linear:
            head.__class__ = HalfStoredLinear
        elif head is not None:  # a head of another kind computes as it is: upcast it
            kept -= {id(p) for p in head.parameters()}
    quantized = {id(p) for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
                 for p in m.parameters()}
    for parameter in model.parameters():
        if id(parameter) in quantized or not parameter.dtype.is_floating_point:
            continue
        keep = id(parameter) in kept or parameter.dtype == torch.float32
        parameter.data = parameter.data.clone() if keep else parameter.data.float()
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.dtype.is_floating_point:
                setattr(module, name, buffer.float() if buffer.dtype != torch.float32 else buffer.clone())
