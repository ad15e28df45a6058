"""The runtime: a mixed batch equals each row alone; swaps leave no trace; eviction and threads change nothing."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import torch

from peft_adapt import AdapterRuntime, Registry, UserInputError

TEXTS = ["def add(a, b): return a + b", "The function returns", "class", "import os\nimport sys\nprint(os.getcwd())"]
SHAPES = [  # (rank, target modules): different ranks and different layers share the stacks
    (4, ["q_proj", "v_proj"]),
    (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    (2, ["o_proj", "down_proj"]),
    (16, ["v_proj", "up_proj"]),
]


def make_lora(base: Path, out: Path, rank: int, targets: list[str], seed: int) -> Path:
    """A peft LoRA folder with random, non-zero A and B (a trained adapter's shape without the training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)  # make every adapter's effect plainly visible in the logits
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama) -> list[Path]:
    root = tmp_path_factory.mktemp("loras")
    return [make_lora(tiny_llama, root / f"a{i}", r, t, seed=i) for i, (r, t) in enumerate(SHAPES)]


@pytest.fixture(scope="module")
def registry_with_adapters(tmp_path_factory, tiny_llama, adapters) -> Registry:
    registry = Registry(tmp_path_factory.mktemp("reg"))
    for i, folder in enumerate(adapters):
        registry.import_peft(folder, base=str(tiny_llama), name=f"ad{i}")
    return registry


def _rows_match_alone(rt: AdapterRuntime, texts, names, atol: float, padding_side: str = "right") -> float:
    mixed = rt.logits(texts, adapters=names, padding_side=padding_side)
    ids = rt.tokenizer(texts)["input_ids"]
    worst = 0.0
    for i, (row, name) in enumerate(zip(ids, names)):
        alone = rt.logits([row], adapters=name)[0]
        got = mixed[i, -len(row):] if padding_side == "left" else mixed[i, : len(row)]
        worst = max(worst, (got - alone).abs().max().item())
    assert worst < atol, worst
    return worst


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_each_row_of_a_mixed_batch_equals_the_row_run_alone(tiny_llama, adapters, padding_side):
    rt = AdapterRuntime(str(tiny_llama), quantization="none")
    for folder in adapters:
        rt.load(str(folder))
    names = [str(adapters[0]), str(adapters[1]), None, str(adapters[3]), str(adapters[2]), str(adapters[0])]
    texts = TEXTS + TEXTS[:2]
    _rows_match_alone(rt, texts, names, atol=1e-5, padding_side=padding_side)
    # and each adapter changes its rows: the test would notice a missing delta
    base = rt.logits(texts[:1], adapters=None)
    assert (rt.logits(texts[:1], adapters=str(adapters[0])) - base).abs().max() > 1e-2


def test_runtime_logits_equal_plain_peft_for_every_adapter(tiny_llama, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rt = AdapterRuntime(str(tiny_llama), quantization="none")
    ids = rt.tokenizer(TEXTS[:1], return_tensors="pt")["input_ids"]
    for folder in adapters:
        rt.load(str(folder))
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), folder).eval()
        with torch.no_grad():
            expected = peft_model(ids).logits
        assert (rt.logits(ids, adapters=str(folder)) - expected).abs().max() < 1e-5


def test_greedy_generation_of_a_mixed_batch_equals_each_row_alone(tiny_llama, adapters):
    rt = AdapterRuntime(str(tiny_llama), quantization="none")
    names = [str(adapters[0]), None, str(adapters[1]), str(adapters[3])]
    mixed = rt.generate(TEXTS, adapters=names, max_new_tokens=12, return_tokens=True)
    alone = [rt.generate([t], adapters=n, max_new_tokens=12, return_tokens=True)[0] for t, n in zip(TEXTS, names)]
    assert mixed == alone
    assert len({tuple(m) for m in mixed}) > 1  # the rows really differ


def test_sampled_generation_is_seeded_and_top_k_1_is_greedy(tiny_llama, adapters):
    rt = AdapterRuntime(str(tiny_llama), quantization="none")
    names = [str(adapters[0]), None, str(adapters[1]), str(adapters[2])]
    first = rt.generate(TEXTS, adapters=names, max_new_tokens=8, do_sample=True, seed=3, return_tokens=True)
    again = rt.generate(TEXTS, adapters=names, max_new_tokens=8, do_sample=True, seed=3, return_tokens=True)
    assert first == again
    top1 = rt.generate(TEXTS, adapters=names, max_new_tokens=8, do_sample=True, top_k=1, seed=5, return_tokens=True)
    assert top1 == rt.generate(TEXTS, adapters=names, max_new_tokens=8, return_tokens=True)


def test_each_row_samples_with_its_own_settings_and_seed_whatever_its_batch_mates(tiny_llama, adapters):
    """Requests of different seeds and temperatures share one batch (issue 31): a seeded row gives the tokens it
    gives alone, and a row past its own max_new_tokens stops."""
    from peft_adapt.runtime.decoding import Sampling

    rt = AdapterRuntime(str(tiny_llama), quantization="none")
    names = [str(adapters[0]), None, str(adapters[1]), str(adapters[2])]
    rows = [Sampling(10, do_sample=True, temperature=0.9, seed=7), Sampling(4), Sampling(10, do_sample=True, seed=8),
            Sampling(6, do_sample=True, temperature=1.3, top_p=0.8, seed=9)]

    def tokens(prompts, adapter_names, samplings):
        out = [[] for _ in prompts]
        for step in rt.generate_stream(prompts, adapter_names, samplings):
            for row, token in zip(out, step):
                if token is not None:
                    row.append(token)
        return out

    together = tokens(TEXTS, names, rows)
    alone = [tokens([t], [n], [s])[0] for t, n, s in zip(TEXTS, names, rows)]
    assert together == alone
    assert [len(t) <= s.max_new_tokens for t, s in zip(together, rows)] == [True] * 4 and len(together[1]) <= 4
    assert tokens([TEXTS[0]], [names[0]], [Sampling(10, do_sample=True, temperature=0.9, seed=1)])[0] != together[0]


def test_unload_and_reuse_of_a_slot_leave_no_trace(tiny_llama, adapters):
    rt = AdapterRuntime(str(tiny_llama), quantization="none")
    big, small = str(adapters[1]), str(adapters[2])  # rank 8 on every layer, then rank 2 on two
    rt.load(big)
    rt.logits(TEXTS[:1], adapters=big)
    slot = rt.residency.adapters[big].slot
    rt.unload(big)
    lora = [site.components["lora"] for site in rt.sites.values()]
    assert all(c.A[slot].abs().sum() == 0 and c.B[slot].abs().sum() == 0 for c in lora)
    assert rt.load(small).slot == slot  # the freed slot is reused
    fresh = AdapterRuntime(str(tiny_llama), quantization="none")
    fresh.load(small)
    assert torch.equal(rt.logits(TEXTS, adapters=small), fresh.logits(TEXTS, adapters=small))
    assert torch.equal(rt.logits(TEXTS, adapters=None), fresh.logits(TEXTS, adapters=None))


def test_eviction_and_reload_give_bit_identical_outputs(tiny_llama, registry_with_adapters):
    reference_rt = AdapterRuntime(str(tiny_llama), quantization="none", registry=registry_with_adapters)
    reference = {f"ad{i}": reference_rt.logits(TEXTS, adapters=f"ad{i}") for i in range(4)}
    rt = AdapterRuntime(str(tiny_llama), quantization="none", registry=registry_with_adapters, max_adapters=2)
    rt.load("ad0", pin=True)
    for name in ["ad1", "ad2", "ad3", "ad1", "ad0", "ad2", "ad3"]:
        assert torch.equal(rt.logits(TEXTS, adapters=name), reference[name]), name
    stats = rt.stats()
    assert stats["evictions"] >= 4 and stats["misses"] >= 5 and stats["hits"] >= 1
    assert "ad0" in rt.resident()  # pinned: never evicted
    assert len(rt.resident()) <= 2
    rt.load("ad1", pin=True)
    with pytest.raises(UserInputError, match="no room for another adapter"):
        rt.load("ad2")


def test_a_byte_budget_limits_residency(tiny_llama, registry_with_adapters):
    rt = AdapterRuntime(str(tiny_llama), quantization="none", registry=registry_with_adapters)
    sizes = {f"ad{i}": rt.load(f"ad{i}").nbytes for i in range(4)}
    budget = sizes["ad1"] + sizes["ad2"]
    limited = AdapterRuntime(str(tiny_llama), quantization="none", registry=registry_with_adapters, max_bytes=budget)
    for name in ["ad0", "ad1", "ad2", "ad3"]:
        limited.logits(TEXTS[:1], adapters=name)
        assert limited.stats()["resident_adapter_bytes"] <= budget


def test_eight_threads_of_random_calls_match_sequential_references(tiny_llama, registry_with_adapters):
    rt = AdapterRuntime(str(tiny_llama), quantization="none", registry=registry_with_adapters, max_adapters=3)
    choices = ["ad0", "ad1", "ad2", "ad3", None]
    reference = {}
    for name in choices:
        for i in range(len(TEXTS)):
            reference[(name, i)] = rt.logits([TEXTS[i]], adapters=name)
    mismatches, errors = [], []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(50):
                name, i = rng.choice(choices), rng.randrange(len(TEXTS))
                if not torch.equal(rt.logits([TEXTS[i]], adapters=name), reference[(name, i)]):
                    mismatches.append((name, i))
        except Exception as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not mismatches


def test_load_time_linear_combination_is_exact(tiny_llama, adapters):
    rt = AdapterRuntime(str(tiny_llama), quantization="none")
    a, b = str(adapters[0]), str(adapters[3])
    rt.load(a)
    rt.load("only-a", weights={a: 1.0, b: 0.0})
    assert (rt.logits(TEXTS, adapters="only-a") - rt.logits(TEXTS, adapters=a)).abs().max() < 1e-5
    rt.load(b)
    rt.load("mix", weights={a: 0.25, b: 0.75})
    # per layer, the combined delta is the weighted sum of the parts' deltas
    for path, site in rt.sites.items():
        layer = site.components["lora"]
        delta = lambda name: layer.B[rt.residency.adapters[name].slot] @ layer.A[rt.residency.adapters[name].slot]  # noqa: E731
        torch.testing.assert_close(delta("mix"), 0.25 * delta(a) + 0.75 * delta(b), atol=1e-6, rtol=1e-5)


def test_nf4_base_mixed_batch_matches_rows_alone(tiny_llama, adapters):
    """On nf4 the base runs bitsandbytes' 4-bit kernels, whose result may depend on the batch shape by float
    rounding (the CPU inference kernel computes in bf16): tolerance 1e-3 on logits of size ~1 (measured 4.5e-5)."""
    rt = AdapterRuntime(str(tiny_llama), quantization="nf4")
    for folder in adapters:
        rt.load(str(folder))
    names = [str(adapters[0]), str(adapters[1]), None, str(adapters[3])]
    _rows_match_alone(rt, TEXTS, names, atol=1e-3)


def test_loading_after_inference_on_nf4_equals_a_fresh_load(tiny_llama, adapters):
    """DESIGN.md trap: peft loading after an eval-mode forward on nf4 gives garbage; the runtime's does not."""
    rt = AdapterRuntime(str(tiny_llama), quantization="nf4")
    rt.load(str(adapters[0]))
    rt.logits(TEXTS, adapters=str(adapters[0]))  # inference first: 4-bit weights get repacked on AVX512-BF16
    rt.load(str(adapters[1]))
    fresh = AdapterRuntime(str(tiny_llama), quantization="nf4")
    fresh.load(str(adapters[1]))
    assert torch.equal(rt.logits(TEXTS, adapters=str(adapters[1])), fresh.logits(TEXTS, adapters=str(adapters[1])))


def test_adapters_that_do_not_fit_are_refused(tmp_path, tiny_llama, adapters, registry_with_adapters):
    from peft_adapt.testing.tiny_models import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "llama", seed=7)
    rt = AdapterRuntime(str(other), quantization="none", registry=registry_with_adapters)
    with pytest.raises(UserInputError, match="weights: same shapes, different weight values"):
        rt.load("ad0")
    wide = build_tiny_model(tmp_path / "wide", "llama", hidden_size=96)
    rt = AdapterRuntime(str(wide), quantization="none")
    with pytest.raises(UserInputError, match="does not fit the base.*lora_A takes 64 inputs, the base layer has 96"):
        rt.load(str(adapters[0]))
    with pytest.raises(UserInputError, match="2 adapter names for 4 rows"):
        AdapterRuntime(str(tiny_llama), quantization="none").logits(TEXTS, adapters=["a", "b"])


def test_classification_runtime_serves_per_row_heads(tmp_path, tiny_bert, sentiment_file):
    from conftest import classification_recipe, write_jsonl

    from peft_adapt import parse_recipe, train_domain
    from peft_adapt.runtime.loading import load_trained

    three = write_jsonl(tmp_path / "three.jsonl", [{"text": f"{w} {w} thing", "label_name": w}
                                                    for w in ["red", "green", "blue"] * 12])
    first = train_domain(parse_recipe(classification_recipe(tiny_bert, sentiment_file, max_steps=10)), "sentiment", tmp_path / "a")
    second = train_domain(parse_recipe(classification_recipe(tiny_bert, three, max_steps=10)), "sentiment", tmp_path / "b")
    rt = AdapterRuntime(str(tiny_bert), task="classification", quantization="none")
    rt.load(str(first.out_dir))
    rt.load(str(second.out_dir))
    texts = ["good great fine", "red red thing", "awful poor", "blue thing"]
    names = [str(first.out_dir), str(second.out_dir), str(first.out_dir), str(second.out_dir)]
    mixed = rt.classify(texts, names)
    assert [r["label"] in ("negative", "positive") for r in mixed] == [True, False, True, False]
    for text, name, row in zip(texts, names, mixed):
        alone = rt.classify([text], name)[0]
        assert alone["label"] == row["label"]
        for k in alone["probs"]:
            assert abs(alone["probs"][k] - row["probs"][k]) < 1e-5
        # the same probabilities as the trained model loaded the ordinary way
        loaded = load_trained(name, quantization="none")
        enc = loaded.backbone.tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            probs = loaded.model(**enc).logits.softmax(-1)[0]
        assert max(abs(p - q) for p, q in zip(probs.tolist(), row["probs"].values())) < 1e-5


def test_generate_cli_uses_one_adapter_per_prompt(tmp_path, tiny_llama, adapters, capsys):
    import json as _json

    from peft_adapt.cli.main import main

    root = tmp_path / "reg"
    registry = Registry(root)
    registry.import_peft(adapters[0], base=str(tiny_llama), name="first")
    registry.import_peft(adapters[1], base=str(tiny_llama), name="second")
    prompts = TEXTS[:3]
    code = main(["generate", "--registry", str(root), "--quantization", "none", "--adapters", "first,second,base",
                 "--max-new-tokens", "6", "--json", *prompts])
    assert code == 0
    rows = [_json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["adapter"] for r in rows] == ["first", "second", None]
    rt = AdapterRuntime(str(tiny_llama), quantization="none", registry=registry)
    assert [r["completion"] for r in rows] == rt.generate(prompts, ["first", "second", None], max_new_tokens=6)
    assert main(["generate", "--registry", str(root), "--adapters", "first,second", *prompts]) == 2
    assert "2 adapters for 3 prompts" in capsys.readouterr().err


def test_classifiers_mix_at_load_time_and_weights_1_0_give_the_first(tmp_path, tiny_bert, sentiment_file, capsys):
    import json

    from conftest import classification_recipe

    from peft_adapt import parse_recipe, train_domain
    from peft_adapt.cli.main import main

    registry = Registry(tmp_path / "reg")
    for seed, name in ((0, "first"), (1, "second")):
        recipe = classification_recipe(tiny_bert, sentiment_file, max_steps=6, seed=seed)
        registry.add(train_domain(parse_recipe(recipe), "sentiment", tmp_path / name).out_dir, name=name)
    rt = AdapterRuntime(str(tiny_bert), task="classification", quantization="none", registry=registry)
    texts = ["good great fine", "awful broken sad", "nice poor lovely"]
    rt.load("only-first", weights={"first": 1.0, "second": 0.0})
    first, only_first = rt.classify(texts, "first"), rt.classify(texts, "only-first")
    for a, b in zip(first, only_first):
        assert b["probs"] == pytest.approx(a["probs"], abs=1e-5)
    rt.load("half", weights={"first": 0.5, "second": 0.5})
    half = rt.classify(texts, "half")
    assert any(abs(h["probs"]["positive"] - f["probs"]["positive"]) > 1e-4 for h, f in zip(half, first))
    with pytest.raises(UserInputError, match="is not allowed"):
        rt.load("first+second", weights={"first": 0.5, "second": 0.5})
    capsys.readouterr()
    code = main(["classify", "--registry", str(registry.root), "--quantization", "none", "--mix", "first=0.5,second=0.5",
                 "--json", *texts])
    assert code == 0
    from_cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for row, h in zip(from_cli, half):
        assert row["probs"] == pytest.approx(h["probs"], abs=1e-5)


def test_batch_invariant_mode_gives_each_row_what_it_gets_alone_on_nf4(tiny_llama, registry_with_adapters):
    """32 prompts of mixed lengths over 4 adapters (and the base): alone, in any batch, or padded, the greedy tokens
    are identical and the logits equal to < 1e-6 (by construction: every row runs as a batch of one, unpadded)."""
    rng = random.Random(3)
    words = "def class return import the of value list print for while self".split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 14))) for _ in range(32)]
    names = [rng.choice(["ad0", "ad1", "ad2", "ad3", None]) for _ in prompts]
    rt = AdapterRuntime(str(tiny_llama), quantization="nf4", registry=registry_with_adapters, batch_invariant=True)
    alone_tokens = [rt.generate([p], [n], max_new_tokens=6, return_tokens=True)[0] for p, n in zip(prompts, names)]
    alone_logits = [rt.logits([p], [n])[0] for p, n in zip(prompts, names)]
    assert rt.generate(prompts, names, max_new_tokens=6, return_tokens=True) == alone_tokens
    order = list(range(32))
    rng.shuffle(order)
    subset = order[:11]
    assert rt.generate([prompts[i] for i in subset], [names[i] for i in subset], max_new_tokens=6,
                       return_tokens=True) == [alone_tokens[i] for i in subset]
    for side in ("left", "right"):
        padded = rt.logits(prompts, names, padding_side=side)
        for i, alone in enumerate(alone_logits):
            row = padded[i, -len(alone):] if side == "left" else padded[i, : len(alone)]
            assert (row - alone).abs().max() < 1e-6, (side, i)


def test_token_logprobs_across_blocks_equal_one_log_softmax(tiny_llama, adapters):
    from peft_adapt.runtime.runtime import LOGPROB_BLOCK

    rt = AdapterRuntime(str(tiny_llama), quantization="none")
    ids = rt.tokenizer(" ".join(TEXTS) * 20)["input_ids"][: LOGPROB_BLOCK + 40]
    assert len(ids) > LOGPROB_BLOCK + 1  # the scored positions span two blocks
    whole = rt.logits([ids], adapters=str(adapters[0]))[0].float().log_softmax(-1)
    for start in (0, 5):
        scores = rt.token_logprobs(ids, str(adapters[0]), start, top=3)
        assert len(scores) == len(ids) - start and (scores[0][0] is None) == (start == 0)
        for p, (logprob, alternatives) in zip(range(max(start, 1), len(ids)), scores[1 - min(start, 1):]):
            assert abs(logprob - float(whole[p - 1, ids[p]])) < 1e-5
            assert list(alternatives) == whole[p - 1].topk(3).indices.tolist()


def test_a_mixed_batch_on_opt_whose_mlp_sees_tokens_flattened_equals_each_row_alone(tmp_path):
    """Issue 32: OPT's MLP reads [rows x tokens, features]; its rows of different adapters crashed the batch."""
    from transformers import AutoModelForCausalLM, OPTConfig

    from peft_adapt.testing.tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    folders = [str(make_lora(tmp_path / "opt", tmp_path / f"l{i}", 4, ["q_proj", "v_proj", "fc1", "fc2"], seed=i))
               for i in range(2)]
    rt = AdapterRuntime(str(tmp_path / "opt"), quantization="none")
    names = [folders[0], None, folders[1], folders[0]]
    _rows_match_alone(rt, TEXTS, names, atol=1e-5, padding_side="left")
    greedy = rt.generate(TEXTS, adapters=names, max_new_tokens=5, return_tokens=True)
    assert greedy == [rt.generate([t], adapters=n, max_new_tokens=5, return_tokens=True)[0] for t, n in zip(TEXTS, names)]
