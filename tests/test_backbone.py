"""Model loading: names resolve or fail clearly; the fingerprint is the checkpoint's, not the quantization's."""

from __future__ import annotations

import shutil

import pytest
import torch

from peft_adapt import UserInputError
from peft_adapt.models.backbone import BaseSpec, load_backbone, resolve_model_path
from peft_adapt.models.builtin_models import BUILTIN_MODELS, verify_sha256
from peft_adapt.models.fingerprint import base_fingerprint, fingerprint_differences
from peft_adapt.testing.tiny_models import build_tiny_model


def test_name_that_resolves_nowhere_says_what_was_tried():
    with pytest.raises(UserInputError, match=r"'no-such-model' resolves nowhere.*smollm2-135m, minilm-l6"):
        resolve_model_path("no-such-model")
    with pytest.raises(UserInputError, match=r"'owner/absent-model' resolves nowhere.*hub could not provide it"):
        resolve_model_path("owner/absent-model")


def test_unknown_quantization_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="'none', 'int8', 'nf4' or 'fp4'"):
        BaseSpec(model="x", quantization="nf5")


@pytest.mark.parametrize("quantization", ["none", "int8", "nf4", "fp4"])
def test_every_quantization_loads_and_runs(tiny_llama, quantization):
    backbone = load_backbone(BaseSpec(model=str(tiny_llama), quantization=quantization))
    ids = backbone.tokenizer("def f(x): return x", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = backbone.model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(backbone.tokenizer))
    assert torch.isfinite(logits).all()


def test_fingerprint_is_the_same_for_every_quantization(tiny_llama):
    ids = {q: load_backbone(BaseSpec(model=str(tiny_llama), quantization=q)).fingerprint["id"] for q in ("none", "int8", "nf4")}
    assert len(set(ids.values())) == 1, ids


def test_fingerprint_tells_architecture_vocabulary_and_weights_apart(tmp_path, tiny_llama):
    base = base_fingerprint(tiny_llama)
    other_weights = base_fingerprint(build_tiny_model(tmp_path / "seed1", "llama", seed=1))
    assert fingerprint_differences(base, other_weights) == ["weights: same shapes, different weight values"]
    bigger_vocab = base_fingerprint(build_tiny_model(tmp_path / "vocab", "llama", vocab_size=400))
    assert any(d.startswith("vocab_size") for d in fingerprint_differences(base, bigger_vocab))
    gpt2 = base_fingerprint(build_tiny_model(tmp_path / "gpt2", "gpt2"))
    assert any(d.startswith("architecture") for d in fingerprint_differences(base, gpt2))
    assert fingerprint_differences(base, base_fingerprint(tiny_llama)) == []


def test_pickle_only_checkpoint_is_refused_unless_allowed(tmp_path, tiny_llama):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama, folder)
    state = {}
    from safetensors.torch import load_file

    for f in folder.glob("*.safetensors"):
        state |= load_file(f)
        f.unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(UserInputError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle"):
        resolve_model_path(str(folder))
    assert resolve_model_path(str(folder), allow_pickle=True) == folder


def test_changed_builtin_weights_are_refused(tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"not the pinned file")
    with pytest.raises(UserInputError, match=r"minilm-l6.*expected 53aa5117.*refusing to use it"):
        verify_sha256(BUILTIN_MODELS["minilm-l6"], fake)


def test_classification_head_pools_over_real_tokens_only(tiny_bert):
    backbone = load_backbone(BaseSpec(model=str(tiny_bert), quantization="none"), "classification", 3, "mean")
    model = backbone.model.eval()
    tok = backbone.tokenizer
    alone = tok(["short text"], return_tensors="pt")
    padded = tok(["short text", "a much longer text that forces padding"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = model(**alone).logits[0]
        b = model(**padded).logits[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_an_encoder_decoder_model_is_refused_by_name(tmp_path, task):
    """T5 crashed at the first step ("You must specify exactly one of input_ids or inputs_embeds")."""
    from transformers import T5Config, T5ForConditionalGeneration

    from peft_adapt.testing.tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                        d_kv=16, decoder_start_token_id=0)).save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    with pytest.raises(UserInputError, match="is an encoder-decoder model \\(t5\\): train it with task seq2seq"):
        load_backbone(BaseSpec(model=str(tmp_path / "t5"), quantization="none"), task, 2)
