"""The Triton LoRA kernels against the PyTorch reference path, on the CPU through Triton's interpreter.

Each check runs in a fresh process: TRITON_INTERPRET must be set before Triton is first imported, and other tests
of this session may have imported it already."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHECK = r"""
import itertools, json, os, sys
import torch
from torch import nn
from peft_adapt.methods.lora import StackedLora
from peft_adapt.runtime.batch import AdapterBatch

dtype = getattr(torch, sys.argv[1])
torch.manual_seed(0)
base = nn.Linear(40, 24)
stack = StackedLora(base, capacity=5, dtype=dtype, device="cpu")
ranks = {1: 2, 2: 8, 3: 5, 4: 1}  # slot 0 is "no adapter": all zeros
for slot, r in ranks.items():
    stack.write(slot, (torch.randn(r, 40), torch.randn(24, r), 0.5))
worst = 0.0
cases = 0
for rows, tokens in itertools.product((1, 3, 6), (1, 7, 33)):
    for trial in range(3):
        slots = torch.randint(0, 5, (rows,)).tolist()
        if len(set(slots)) == 1:
            slots[0] = (slots[0] + 1) % 5  # a mixed batch: the gathered path
        batch = AdapterBatch.build(slots, {s: ("lora", r) for s, r in ranks.items()}, "cpu")
        x = torch.randn(rows, tokens, 40).to(dtype)
        os.environ["PEFT_ADAPT_KERNELS"] = "off"
        reference = stack.apply(x, batch).float()
        os.environ["PEFT_ADAPT_KERNELS"] = "triton"
        fused = stack.apply(x, batch).float()
        scale = reference.abs().max().clamp_min(1e-6)
        worst = max(worst, float((fused - reference).abs().max() / scale))
        cases += 1
print(json.dumps({"worst_relative": worst, "cases": cases}))
"""


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_kernels_equal_the_reference_for_every_mix_of_slots_and_ranks(dtype, tolerance):
    env = os.environ | {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK, dtype], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cases"] == 27
    assert result["worst_relative"] < tolerance, result


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_kernels_equal_the_reference_on_cuda_at_serving_shapes(dtype, tolerance, monkeypatch):
    import torch
    from torch import nn

    from peft_adapt.methods.lora import StackedLora
    from peft_adapt.runtime.batch import AdapterBatch

    torch.manual_seed(0)
    stack = StackedLora(nn.Linear(4096, 4096), capacity=33, dtype=getattr(torch, dtype), device="cuda")
    for slot in range(1, 33):
        stack.write(slot, (torch.randn(16, 4096, device="cuda") / 64, torch.randn(4096, 16, device="cuda") / 4, 2.0))
    for tokens in (1, 128):  # decode, and prefill segments
        batch = AdapterBatch.build(list(range(1, 33)), {s: ("lora", 16) for s in range(1, 33)}, "cuda")
        x = torch.randn(32, tokens, 4096, device="cuda").to(getattr(torch, dtype))
        monkeypatch.setenv("PEFT_ADAPT_KERNELS", "off")
        reference = stack.apply(x, batch).float()
        monkeypatch.setenv("PEFT_ADAPT_KERNELS", "auto")
        fused = stack.apply(x, batch).float()
        assert float((fused - reference).abs().max() / reference.abs().max()) < tolerance
