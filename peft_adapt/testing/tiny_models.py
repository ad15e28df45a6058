"""Tiny random models built from a config, with a real tokenizer, for tests and quick benchmarks.

No download: the tokenizer is a byte-level BPE trained on a fixed text from the standard library,
the weights are random with a fixed seed, and everything is saved as a plain Hugging Face folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.shards import ShardWriter, parse_size

FAMILIES = ("llama", "bert", "gpt2")


def _training_text() -> list[str]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [topics[k] for k in sorted(topics)][:60]


def build_tokenizer(vocab_size: int = 320, bert_style: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>"] + (["[MASK]"] if bert_style else [])
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    if bert_style:
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]",
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )


def build_tiny_model(path: str | Path, family: str = "llama", seed: int = 0, hidden_size: int = 64,
                     num_layers: int = 2, vocab_size: int = 320) -> Path:
    """Save a tiny random `family` model (causal LM for llama/gpt2, encoder for bert) to `path`."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(vocab_size, bert_style=family == "bert")
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        model = LlamaForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=hidden_size, n_layer=num_layers, n_head=4, n_positions=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        model = GPT2LMHeadModel(config)
    elif family == "bert":
        config = BertConfig(
            vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=4, max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = BertModel(config)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# TinyLlama's shape, and smaller ones of the same family: the sizes the scale benchmark measures
LLAMA_SHAPES = {
    "0.15b": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4),
    "0.4b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=22, num_attention_heads=16,
                 num_key_value_heads=4),
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4),
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
               num_key_value_heads=32),
}


def build_random_llama(path: str | Path, shape: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                       max_shard_size: str = "500MB") -> Path:
    """A random-weight Llama of one of `LLAMA_SHAPES` (vocabulary 32000, untied head), saved in `dtype` shards as a
    hub model is, without ever holding the model: each tensor is drawn and written on its own."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM


    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(320)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **LLAMA_SHAPES[shape])
    config.dtype = dtype
    with init_empty_weights():
        empty = LlamaForCausalLM(config)
    shapes = [(name, tuple(p.shape)) for name, p in empty.state_dict().items()]
    writer = ShardWriter(path, [(name, s, dtype) for name, s in shapes], parse_size(max_shard_size))
    generator = torch.Generator().manual_seed(seed)
    for name, s in shapes:
        if name.endswith("norm.weight"):
            tensor = torch.ones(s)
        else:
            tensor = torch.randn(s, generator=generator) * config.initializer_range
        writer.write(name, tensor.to(dtype))
    writer.close()
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_random_lora(base: str | Path, out: str | Path, rank: int, targets: list[str], seed: int) -> Path:
    """A peft LoRA folder for `base` with random A and B, from the base's config alone (no model is loaded)."""
    import json

    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in empty.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, module.in_features,
                                                                          generator=generator) / module.in_features**0.5
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, rank,
                                                                          generator=generator) * 0.01
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
              "target_modules": targets, "base_model_name_or_path": str(base), "bias": "none", "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


# tiny random models of the architectures users bring (hidden 64, 2 layers, 4 heads): what each config needs beyond
# the shared sizes; causal decoders, encoders and encoder-decoders, as transformers builds them offline
ARCHITECTURES = {
    "llama": {"intermediate_size": 128, "num_key_value_heads": 2},
    "mistral": {"intermediate_size": 128, "num_key_value_heads": 2, "sliding_window": None},
    "qwen2": {"intermediate_size": 128, "num_key_value_heads": 2},
    "qwen3": {"intermediate_size": 128, "num_key_value_heads": 2, "head_dim": 16},
    "gemma2": {"intermediate_size": 128, "num_key_value_heads": 2, "head_dim": 16},
    "gemma3_text": {"intermediate_size": 128, "num_key_value_heads": 2, "head_dim": 16},
    "phi3": {"intermediate_size": 128},
    "gpt2": {},
    "gpt_neox": {"intermediate_size": 128},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "falcon": {},
    "bert": {"intermediate_size": 128},
    "roberta": {"intermediate_size": 128},
    "deberta-v2": {"intermediate_size": 128},
    "modernbert": {"intermediate_size": 128, "cls_token_id": 2, "sep_token_id": 3},  # the tokenizer's [CLS], [SEP]
    "distilbert": {"dim": 64, "hidden_dim": 128, "n_layers": 2, "n_heads": 4},
    "t5": {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16, "decoder_start_token_id": 0},
    "bart": {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
             "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128},
}


def build_tiny_architecture(path: str | Path, model_type: str, seed: int = 0) -> Path:
    """Save a tiny random model of `model_type` (a key of ARCHITECTURES) with this module's tokenizer: a causal
    decoder with its LM head, an encoder bare (as sentence encoders ship), an encoder-decoder with its LM head."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from ..models.backbone import is_causal_decoder  # lazy: testing helpers load no model code until asked

    path = Path(path)
    probe = AutoConfig.for_model(model_type)
    encoder_only = not probe.is_encoder_decoder and not is_causal_decoder(probe)
    tokenizer = build_tokenizer(320, bert_style=encoder_only)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id if not encoder_only else None,
        eos_token_id=tokenizer.eos_token_id if not encoder_only else None, **ARCHITECTURES[model_type])
    torch.manual_seed(seed)
    builder = (AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModel if encoder_only
               else AutoModelForCausalLM)
    builder.from_config(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
