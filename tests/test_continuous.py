"""Continuous batching (issue 31): requests join the running batch at the next decode step and leave at their own
end; every row generates what it generates alone, whoever joins or leaves around it.

The batcher runs in-process on the tiny fp32 model; ordering ("before the long row finishes") is made certain by
submitting from inside another job's token callback, never by sleeping.
"""

from __future__ import annotations

import threading

import pytest
from test_runtime import SHAPES, make_lora

from peft_adapt import AdapterRuntime, Registry
from peft_adapt.runtime.batcher import DynamicBatcher, GenerationJob
from peft_adapt.runtime.decoding import Sampling

TEXTS = ["def add(a, b): return a + b", "The function returns", "class", "import os\nimport sys\nprint(os.getcwd())"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_llama) -> list[str]:
    root = tmp_path_factory.mktemp("cb-loras")
    return [str(make_lora(tiny_llama, root / f"a{i}", r, t, seed=i)) for i, (r, t) in enumerate(SHAPES)]


@pytest.fixture(scope="module")
def runtime(tiny_llama, loras) -> AdapterRuntime:
    rt = AdapterRuntime(str(tiny_llama), quantization="none")
    for folder in loras:
        rt.load(folder)
    return rt


class Job:
    """A generation job whose events are recorded; `on_token(job, count)` runs in the worker at each new piece."""

    def __init__(self, prompt, adapter, sampling, on_token=None):
        self.events, self.done = [], threading.Event()
        self.on_token = on_token
        self.job = GenerationJob(list(prompt), adapter, sampling, self._emit)

    def _emit(self, kind, value):
        self.events.append((kind, value))
        if kind == "text" and self.on_token:
            self.on_token(self, value[1])
        if kind in ("done", "error"):
            self.done.set()

    def wait(self) -> list[int]:
        assert self.done.wait(120), "the job never finished"
        kind, value = self.events[-1]
        assert kind == "done", value
        return self.job.tokens


def served_together(batcher: DynamicBatcher, rows: list[tuple]) -> list[list[int]]:
    """One job per (prompt, adapter, sampling) row, all submitted at once; each one's tokens. Closes the batcher."""
    jobs = [Job(*row) for row in rows]
    try:
        for job in jobs:
            batcher.submit(job.job)
        return [job.wait() for job in jobs]
    finally:
        batcher.close()


def alone(rt: AdapterRuntime, prompt, adapter, sampling: Sampling) -> list[int]:
    """What the runtime generates for this one row by itself (the whole-request path)."""
    tokens = []
    for step in rt.generate_stream([list(prompt)], [adapter], [sampling]):
        if step[0] is not None:
            tokens.append(step[0])
    return tokens


def ids(rt, text: str) -> list[int]:
    return rt.tokenizer(text)["input_ids"]


def test_a_request_joins_the_running_batch_and_every_row_equals_alone(runtime, loras):
    """A short request sent while a long one decodes (and while another long prompt is read in chunks) finishes
    before the long one does; all three give the tokens they give alone."""
    joined = []
    batcher = DynamicBatcher(runtime, prefill_chunk=16, on_batch=joined.append)
    long_prompt, long_sampling = ids(runtime, TEXTS[3] * 6), Sampling(40, min_new_tokens=40)
    short = Job(ids(runtime, TEXTS[1]), loras[1], Sampling(3))
    reader = Job(ids(runtime, TEXTS[0] * 8), loras[2], Sampling(5, do_sample=True, seed=11))
    long_at_short_done, sent = [], []

    def send_others(job, count):
        if count >= 3 and not reader.events and not short.events and reader.job not in sent:
            sent.append(reader.job)  # the long row is decoding: the others arrive now
            batcher.submit(reader.job)
            batcher.submit(short.job)
        if short.done.is_set() and not long_at_short_done:
            long_at_short_done.append(count)

    long = Job(long_prompt, loras[0], long_sampling, on_token=send_others)
    try:
        batcher.submit(long.job)
        got = [long.wait(), short.wait(), reader.wait()]
    finally:
        batcher.close()
    assert long_at_short_done and long_at_short_done[0] < 40  # the short one ended while the long one ran
    assert got == [alone(runtime, long_prompt, loras[0], long_sampling),
                   alone(runtime, ids(runtime, TEXTS[1]), loras[1], Sampling(3)),
                   alone(runtime, ids(runtime, TEXTS[0] * 8), loras[2], Sampling(5, do_sample=True, seed=11))]
    assert max(joined) >= 2  # they really shared the running batch
    assert len(reader.job.prompt) > 16 and not runtime.adapters.in_use


def test_a_seeded_request_gives_the_same_tokens_alone_and_among_others(runtime, loras):
    seeded = Sampling(12, do_sample=True, temperature=0.9, top_p=0.9, seed=1234)
    prompt = ids(runtime, TEXTS[0])
    expected = alone(runtime, prompt, loras[3], seeded)
    batcher = DynamicBatcher(runtime, prefill_chunk=8)
    others = [Job(ids(runtime, t * (i + 1)), loras[i % 4] if i % 3 else None,
                  Sampling(4 + 5 * i, do_sample=i % 2 == 0, seed=i, temperature=1.2))
              for i, t in enumerate(TEXTS * 2)]

    pending = others[2:]

    def more(job, count):
        if pending:  # batch-mates joining mid-run, two per token, and leaving at their own ends
            batcher.submit(pending.pop(0).job)
            batcher.submit(pending.pop(0).job)

    first = Job(prompt, loras[3], seeded, on_token=more)
    try:
        batcher.submit(others[0].job)
        batcher.submit(first.job)
        batcher.submit(others[1].job)
        assert first.wait() == expected
        for other in others:
            other.wait()
    finally:
        batcher.close()
    assert alone(runtime, prompt, loras[3], Sampling(12, do_sample=True, temperature=0.9, top_p=0.9, seed=1)) != expected


def test_penalties_and_bias_follow_openai_and_agree_between_schedulers(runtime, loras):
    import torch

    from peft_adapt.runtime.decoding import adjust_rows

    logits = torch.zeros(2, 6)
    rows = [Sampling(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((1, 3.0),)), Sampling()]
    adjusted = adjust_rows(logits, rows, [[2, 2, 4], [2]])
    assert adjusted[0].tolist() == [0.0, 3.0, -1.0, 0.0, -0.75, 0.0] and adjusted[1].tolist() == [0.0] * 6
    assert logits.abs().sum() == 0  # the input is left as it was
    samplings = [Sampling(10, presence_penalty=1.5, frequency_penalty=0.5),
                 Sampling(10, do_sample=True, seed=4, frequency_penalty=-1.0, logit_bias=((70, 2.0),)), Sampling(10)]
    prompts = [ids(runtime, t) for t in TEXTS[:3]]
    got = served_together(DynamicBatcher(runtime), [(p, loras[i], s) for i, (p, s) in enumerate(zip(prompts, samplings))])
    assert got == [alone(runtime, p, loras[i], s) for i, (p, s) in enumerate(zip(prompts, samplings))]
    assert got[0] != alone(runtime, prompts[0], loras[0], Sampling(10))  # the penalty changed something


def test_a_cancelled_row_leaves_at_the_next_step_and_frees_its_adapter(runtime, loras):
    batcher = DynamicBatcher(runtime)
    after = Job(ids(runtime, TEXTS[2]), loras[1], Sampling(3))

    def leave(job, count):
        if count >= 2 and not job.job.cancelled:
            job.job.cancelled = True  # as the server does when the client goes away
            batcher.submit(after.job)

    gone = Job(ids(runtime, TEXTS[0]), loras[0], Sampling(200, min_new_tokens=200), on_token=leave)
    try:
        batcher.submit(gone.job)
        assert gone.done.wait(120) and after.wait() == alone(runtime, ids(runtime, TEXTS[2]), loras[1], Sampling(3))
    finally:
        batcher.close()
    assert gone.job.generated <= 3 and batcher.cancelled == 1
    assert gone.events[-1] == ("done", ("stop", gone.job.generated)) and not runtime.adapters.in_use


def test_admission_waits_for_the_kv_budget_and_refuses_what_never_fits(runtime, loras):
    """Budget for two rows of (prompt + max_new_tokens) at a time: five requests all finish, equal alone, never
    more than two running; a request larger than the whole budget is refused naming --kv-budget."""
    prompts = [ids(runtime, t) for t in TEXTS + TEXTS[:1]]
    need = max(len(p) for p in prompts) + 10
    joined = []
    batcher = DynamicBatcher(runtime, kv_budget=2 * need, on_batch=joined.append)
    jobs = [Job(p, loras[i % 4], Sampling(10, min_new_tokens=10)) for i, p in enumerate(prompts)]
    huge = Job(ids(runtime, TEXTS[3] * 3), None, Sampling(2 * need))
    try:
        for job in jobs:
            batcher.submit(job.job)
        got = [job.wait() for job in jobs]
        batcher.submit(huge.job)
        assert huge.done.wait(60)
    finally:
        batcher.close()
    assert got == [alone(runtime, p, loras[i % 4], Sampling(10, min_new_tokens=10)) for i, p in enumerate(prompts)]
    assert max(joined) == 2
    kind, error = huge.events[-1]
    assert kind == "error" and "--kv-budget" in str(error) and f"at most {2 * need}" in str(error)


def test_batch_invariant_rows_each_run_alone_and_match_exactly(tiny_llama, loras):
    rt = AdapterRuntime(str(tiny_llama), quantization="nf4", batch_invariant=True)
    rows = [(ids(rt, t), loras[i] if i < 3 else None, Sampling(6, do_sample=i % 2 == 1, seed=i))
            for i, t in enumerate(TEXTS)]
    expected = [alone(rt, *row) for row in rows]
    joined = []
    assert served_together(DynamicBatcher(rt, on_batch=joined.append), rows) == expected
    assert joined == [1, 1, 1, 1]  # every row its own batch


def test_a_registry_change_waits_for_the_rows_of_the_old_version(tmp_path, tiny_llama):
    """A request for a name that the registry moved to a new version while older rows of it were running gets the
    new version; the running rows finish on the one they began with."""
    registry = Registry(tmp_path / "reg")
    old = make_lora(tiny_llama, tmp_path / "v1", 4, ["q_proj", "v_proj"], seed=1)
    new = make_lora(tiny_llama, tmp_path / "v2", 4, ["q_proj", "v_proj"], seed=2)
    registry.import_peft(old, base=str(tiny_llama), name="code")
    rt = AdapterRuntime(str(tiny_llama), quantization="none", registry=registry)
    prompt = ids(rt, TEXTS[0])
    expected_old = alone(rt, prompt, str(old), Sampling(12, min_new_tokens=12))
    expected_new = alone(rt, prompt, str(new), Sampling(6))
    assert expected_old[:6] != expected_new
    batcher = DynamicBatcher(rt)
    later, moved = Job(prompt, "code", Sampling(6)), []

    def move(job, count):
        if count >= 2 and not later.events and later.job not in moved:
            moved.append(later.job)
            registry.import_peft(new, base=str(tiny_llama), name="code")
            batcher.submit(later.job)

    running = Job(prompt, "code", Sampling(12, min_new_tokens=12), on_token=move)
    try:
        batcher.submit(running.job)
        assert running.wait() == expected_old
        assert later.wait() == expected_new
    finally:
        batcher.close()
    assert rt.residency.adapters["code"].version == 2


def test_the_whole_request_scheduler_stays_available(runtime, loras):
    batcher = DynamicBatcher(runtime, scheduler="request")
    assert batcher.steps is None
    rows = [(ids(runtime, t), loras[i], Sampling(5)) for i, t in enumerate(TEXTS)]
    assert served_together(batcher, rows) == [alone(runtime, *row) for row in rows]


def test_unknown_scheduler_is_refused(runtime):
    from peft_adapt import UserInputError

    with pytest.raises(UserInputError, match="scheduler 'steps' is not known; use step or request"):
        DynamicBatcher(runtime, scheduler="steps")
