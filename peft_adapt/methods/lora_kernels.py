"""Triton kernels for a mixed batch's LoRA deltas, reading each row's factors in place from the stacks.

The PyTorch path (`StackedLora.apply`) gathers every row's A and B (`index_select`: a copy of both factors per row)
before two `bmm`s. These kernels index the stacks by slot instead (as Punica's BGMV/SGMV and vLLM's LoRA ops do):

    shrink:  h[i, t, :r]  = x[i, t, :] @ A[slot[i], :r, :]^T
    expand:  y[i, t, :]  += h[i, t, :r] @ B[slot[i], :, :r]^T      (added to the base output, in place)

A program takes a tile of one batch row's tokens (one slot: a decode row is a tile of one token, a prefill row a
segment of many) and a tile of output features, so a factor is read once per tile, never copied. Stacks are padded
to the largest rank in use with zeros, so any mix of ranks gives the right sums. Accumulation is in fp32.

Chosen on CUDA when Triton is importable (`use_kernels`); the PyTorch path stays the reference and the CPU path.
With TRITON_INTERPRET=1 the kernels run on CPU tensors, which is how CI checks them against the reference.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_kernels(x: torch.Tensor) -> bool:
    """Kernels on CUDA (PEFT_ADAPT_KERNELS=off turns them off), or anywhere under Triton's interpreter when
    PEFT_ADAPT_KERNELS=triton asks for them."""
    choice = os.environ.get("PEFT_ADAPT_KERNELS", "auto")
    if choice == "off" or not triton_available():
        return False
    if choice == "triton":
        return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return x.is_cuda


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def shrink(x_ptr, a_ptr, slot_ptr, h_ptr, tokens, in_features, rank,
               stride_xr, stride_xt, stride_as, stride_ar, stride_hr, stride_ht,
               BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
               UPCAST: tl.constexpr):
        row, tile = tl.program_id(0), tl.program_id(1)
        slot = tl.load(slot_ptr + row)
        t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        r = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(x_ptr + row * stride_xr + t[:, None] * stride_xt + k[None, :],
                         mask=(t[:, None] < tokens) & (k[None, :] < in_features), other=0.0)
            a = tl.load(a_ptr + slot * stride_as + r[None, :] * stride_ar + k[:, None],  # A[slot]^T: [K, R]
                        mask=(r[None, :] < rank) & (k[:, None] < in_features), other=0.0)
            if UPCAST:
                xs, a = xs.to(tl.float32), a.to(tl.float32)
            if IEEE:
                acc += tl.dot(xs, a, input_precision="ieee")
            else:
                acc += tl.dot(xs, a)
        tl.store(h_ptr + row * stride_hr + t[:, None] * stride_ht + r[None, :], acc,
                 mask=(t[:, None] < tokens) & (r[None, :] < rank))

    @triton.jit
    def expand(h_ptr, b_ptr, slot_ptr, y_ptr, tokens, out_features, rank,
               stride_hr, stride_ht, stride_bs, stride_bo, stride_yr, stride_yt,
               BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
               UPCAST: tl.constexpr):
        row, tile, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        slot = tl.load(slot_ptr + row)
        t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        o = block * BLOCK_O + tl.arange(0, BLOCK_O)
        r = tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + row * stride_hr + t[:, None] * stride_ht + r[None, :],
                    mask=(t[:, None] < tokens) & (r[None, :] < rank), other=0.0)
        b = tl.load(b_ptr + slot * stride_bs + o[None, :] * stride_bo + r[:, None],  # B[slot]^T: [R, O]
                    mask=(o[None, :] < out_features) & (r[:, None] < rank), other=0.0)
        h = h.to(b.dtype)
        if UPCAST:
            h, b = h.to(tl.float32), b.to(tl.float32)
        if IEEE:
            delta = tl.dot(h, b, input_precision="ieee")
        else:
            delta = tl.dot(h, b)
        mask = (t[:, None] < tokens) & (o[None, :] < out_features)
        target = y_ptr + row * stride_yr + t[:, None] * stride_yt + o[None, :]
        y = tl.load(target, mask=mask, other=0.0)
        tl.store(target, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)

    return shrink, expand


def _block(n: int, least: int = 16, most: int = 64) -> int:
    """A power of two covering n, within tl.dot's smallest tile and a register-friendly largest."""
    block = least
    while block < n and block < most:
        block *= 2
    return block


def lora_delta_into(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor,
                    rank: int) -> torch.Tensor:
    """y += each row's LoRA delta, in place: x [rows, tokens, in], y [rows, tokens, out], A [slots, R, in],
    B [slots, out, R] (scale folded into B), slots [rows]; only the first `rank` of R are read."""
    shrink, expand = _kernels()
    import triton

    rows, tokens, in_features = x.shape
    out_features = y.shape[-1]
    x = x.to(A.dtype).contiguous()
    if A.stride(-1) != 1 or B.stride(-1) != 1 or y.stride(-1) != 1:
        raise ValueError("the stacks and the output must be contiguous in their last dimension")
    h = torch.empty(rows, tokens, rank, device=x.device, dtype=torch.float32)
    block_t, block_r = _block(tokens), _block(rank, most=128)
    ieee = A.dtype == torch.float32  # fp32 stays fp32 (no TF32): the reference's precision
    # Triton's interpreter computes 16-bit tl.dot wrongly (measured: garbage for bf16); there the tiles are
    # widened to fp32 first, which every other step of the kernel (indexing, masks, fp32 accumulation) shares
    upcast = A.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1"
    shrink[(rows, triton.cdiv(tokens, block_t))](
        x, A, slots, h, tokens, in_features, rank, x.stride(0), x.stride(1), A.stride(0), A.stride(1),
        h.stride(0), h.stride(1), BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_K=_block(in_features), IEEE=ieee,
        UPCAST=upcast)
    block_o = _block(out_features)
    expand[(rows, triton.cdiv(tokens, block_t), triton.cdiv(out_features, block_o))](
        h, B, slots, y, tokens, out_features, rank, h.stride(0), h.stride(1), B.stride(0), B.stride(1),
        y.stride(0), y.stride(1), BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_R=block_r, IEEE=ieee, UPCAST=upcast)
    return y
