"""The second hardening round's probes (issue 30) re-run against real servers in subprocesses: spellings of one
version, routers with bad members, text no tokenizer can encode, fields the server does not implement, and what an
answer may say about where the server keeps things. Each test failed on main before that round."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import httpx
import pytest
import torch
from test_runtime import make_lora
from test_server import _auth, _error, _start

from peft_adapt import Registry
from peft_adapt.routing.router import SIGNATURE, write_signature

PROMPT = "def add(a, b):"


def _signature(folder: Path, width: int, shift: float, seed: int) -> Path:
    torch.manual_seed(seed)
    return write_signature(folder, torch.randn(16, width) + shift, 0, 8.0)


def signed(registry: Registry, base: Path, work: Path, name: str, width: int, shift: float, seed: int):
    """A LoRA registered as `name`, then signed with features of `width` around `shift` (a new version)."""
    registry.import_peft(make_lora(base, work / name, 4, ["q_proj", "v_proj"], seed=seed), base=str(base), name=name)
    with tempfile.TemporaryDirectory() as scratch:
        return registry.add_files(name, {SIGNATURE: _signature(Path(scratch), width, shift, seed)})


@pytest.fixture(scope="module")
def probed(tmp_path_factory, tiny_llama):
    """A server over `code` and `math` (signed, far apart) and `wide` (signed with features of another base's
    width: well formed, so the registry takes it; routing must leave it out)."""
    root = tmp_path_factory.mktemp("probed")
    registry = Registry(root / "reg")
    signed(registry, tiny_llama, root, "code", 64, 4.0, 1)
    signed(registry, tiny_llama, root, "math", 64, -4.0, 2)
    signed(registry, tiny_llama, root, "wide", 32, 0.0, 3)
    proc, url = _start(tiny_llama, registry.root, "--max-tokens", "16", "--max-adapters", "4")
    yield url, registry, proc
    proc.terminate()
    proc.wait(timeout=30)


def _post(url: str, path: str, body: dict) -> httpx.Response:
    """JSON as a client may write it: `\\ud800` escapes included (json.dumps escapes what UTF-8 cannot hold)."""
    return httpx.post(f"{url}{path}", content=json.dumps(body), timeout=120,
                      headers=_auth() | {"content-type": "application/json"})


def _complete(url: str, model: str, **extra) -> httpx.Response:
    return _post(url, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 2, "temperature": 0} | extra)


def _no_locations(response: httpx.Response, registry: Registry, base: Path) -> None:
    text = response.text
    for private in (str(registry.root), str(Path(registry.root).resolve()), str(base), "registry.db", "/tmp/"):
        assert private not in text, (private, text)


def test_one_version_has_one_resident_whatever_its_spelling(probed):
    url, _, _ = probed
    for spelling in ("code@01", "code@001", "code@" + "0" * 280 + "2", "code@١", "code@𝟙", "code@²",
                     "code@99999999999999999999", "code@2147483648"):
        response = _complete(url, spelling)
        assert response.status_code == 400, (spelling, response.text)
    for spelling in ("code", "code@latest", "code@2", "code", "code@latest"):
        assert _complete(url, spelling).status_code == 200
    resident = httpx.get(f"{url}/health").json()["resident"]
    assert len(resident) <= 4 and len([r for r in resident if r.startswith("code")]) <= 2, resident


def test_a_default_residency_budget_bounds_what_requests_make_resident():
    from peft_adapt.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--base", "x"])
    assert args.max_adapters == 32  # no budget at all kept every name a client sent resident until restart


def test_a_malformed_signature_leaves_out_only_its_adapter(probed):
    url, registry, proc = probed
    routed = _complete(url, "auto")  # `wide` is signed at another width: left out, the rest route
    assert routed.status_code == 200, routed.text
    assert routed.headers["x-peft-adapt-adapter"] in ("code", "math", "base")
    named = _complete(url, "auto:code,wide")  # named outright: that client hears why
    _error(named, 400, "wide@2: its signature reads 32 features")
    assert "routing leaves wide@2 out" in proc.log_path.read_text()


def test_lone_surrogates_and_odd_versions_are_400s(probed):
    url, _, _ = probed
    chat = {"model": "code", "messages": [{"role": "user", "content": "a\ud800b"}], "max_tokens": 2}
    for response in (_complete(url, "code", prompt="x\ud800"), _complete(url, "code", prompt=["ok", "\udfff"]),
                     _post(url, "/v1/chat/completions", chat),
                     _complete(url, "auto:code@١,math"), _complete(url, "auto:code,math@²")):
        assert response.status_code == 400, response.text
    assert _complete(url, "code").status_code == 200  # still serving


@pytest.mark.parametrize("field,value", [("best_of", 2), ("top_logprobs", 1), ("suffix", "x")])
def test_fields_the_server_does_not_implement_are_refused_by_name(probed, field, value):
    url, _, _ = probed
    _error(_complete(url, "code", **{field: value}), 400, f"does not implement {field}")
    assert _complete(url, "code", **{field: None}).status_code == 200  # the default, as SDKs send it


def test_penalties_bias_and_min_tokens_act_and_bad_values_are_400s(probed, tiny_llama):
    """logit_bias +100 on one token makes greedy decoding choose it every step; a presence penalty changes what a
    repeating greedy row says; min_tokens holds the end off; out-of-range values are refused by name."""
    url, _, _ = probed
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    a = tokenizer.convert_tokens_to_ids("a")
    forced = _complete(url, "code", max_tokens=4, temperature=0, logit_bias={str(a): 100})
    assert forced.status_code == 200 and forced.json()["choices"][0]["text"] == "aaaa", forced.text
    plain = _complete(url, "code", max_tokens=8, temperature=0).json()["choices"][0]["text"]
    penalized = _complete(url, "code", max_tokens=8, temperature=0, presence_penalty=2, frequency_penalty=2)
    assert penalized.status_code == 200 and penalized.json()["choices"][0]["text"] != plain
    eos = {str(tokenizer.eos_token_id): 100}
    assert _complete(url, "code", max_tokens=6, temperature=0, logit_bias=eos).json()["usage"]["completion_tokens"] == 1
    held = _complete(url, "code", max_tokens=6, min_tokens=6, temperature=0, logit_bias=eos)
    assert held.json()["usage"]["completion_tokens"] == 6
    for body, field in (({"logit_bias": {str(i): 1 for i in range(301)}}, "at most 300"),
                        ({"logit_bias": {"99999999": 1}}, "token ids run 0-"),
                        ({"logit_bias": {"x1": 1}}, "decimal strings"), ({"logit_bias": {"1": 101}}, "outside"),
                        ({"presence_penalty": 3}, "presence_penalty"), ({"min_tokens": 20, "max_tokens": 4}, "exceeds")):
        _error(_complete(url, "code", **body), 400, field)


def test_token_array_prompts_are_read_as_the_text_they_spell(probed, tiny_llama):
    """OpenAI's API (and lm-evaluation-harness's local-completions) may send prompts as token ids."""
    from transformers import AutoTokenizer

    url, _, _ = probed
    ids = AutoTokenizer.from_pretrained(tiny_llama)(PROMPT)["input_ids"]
    as_text = _complete(url, "code", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1, echo=True).json()
    for prompt in (ids, [ids]):
        as_ids = _complete(url, "code", prompt=prompt, max_tokens=5, temperature=0, logprobs=1, echo=True).json()
        assert as_ids["choices"][0]["logprobs"] == as_text["choices"][0]["logprobs"]
        assert as_ids["choices"][0]["text"] == as_text["choices"][0]["text"]
    two = _complete(url, "code", prompt=[ids, ids[:3]], max_tokens=2, temperature=0).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    _error(_complete(url, "code", prompt=[ids[0], 10**7]), 400, "token ids outside")
    for bad in ([], [[]], [1, "a"], [-1]):
        assert _complete(url, "code", prompt=bad).status_code == 400


def test_answers_never_say_where_the_registry_or_the_base_lie(probed, tiny_llama):
    url, registry, _ = probed
    for response in (_complete(url, "auto:nosuch,code"), _complete(url, "nosuch"), _complete(url, str(tiny_llama)),
                     _complete(url, "code@7"), httpx.get(f"{url}/v1/models", headers=_auth())):
        _no_locations(response, registry, tiny_llama)
    refused = _complete(url, "auto:nosuch,code")
    assert refused.status_code == 400 and "math" not in refused.text  # nor what else the registry holds


def test_spellings_of_one_router_share_one_build(probed, tiny_llama):
    from peft_adapt import AdapterRuntime

    _, registry, _ = probed
    runtime = AdapterRuntime(str(tiny_llama), quantization="none", registry=registry)
    routers = {id(runtime.router(s)) for s in ("auto:code,math", "auto:math,code", "auto: math , code",
                                                 "auto:code@latest,math", "auto:math,code@latest")}
    assert len(routers) == 1 and len(runtime._routers._built) == 1


def test_a_chat_of_30000_messages_is_refused_before_it_is_templated(probed):
    url, _, _ = probed
    messages = [{"role": "user", "content": ""}] * 30_000  # 930 kB, under the body limit
    _error(_post(url, "/v1/chat/completions", {"model": "code", "messages": messages}), 400, "messages")


def test_a_long_classify_text_is_cut_off_the_batcher_thread_to_what_the_base_reads(tiny_bert):
    from peft_adapt import AdapterRuntime
    from peft_adapt.server.routes import ServerState
    from peft_adapt.server.schemas import ServerSettings

    runtime = AdapterRuntime(str(tiny_bert), task="classification", quantization="none")
    state = ServerState(runtime, None, None, ServerSettings("b", max_prompt_tokens=runtime.max_positions), None)
    long = "apple banana cherry grape " * 36_000  # 900 kB
    (cut,) = state.cut_texts([long])
    assert len(cut) < 20_000
    ids = runtime.tokenizer(long, truncation=True, max_length=runtime.max_positions)["input_ids"]
    assert runtime.tokenizer(cut, truncation=True, max_length=runtime.max_positions)["input_ids"] == ids
    assert state.cut_texts(["short text"]) == ["short text"]


def test_an_abandoned_generation_stops_instead_of_running_to_its_end(guarded):
    import time

    body = {"model": "a", "prompt": PROMPT, "max_tokens": 400, "temperature": 0}  # 20 s of steps if left to run
    with pytest.raises(httpx.TimeoutException):  # the client gives up and closes its connection
        httpx.post(f"{guarded}/v1/completions", json=body, headers=_auth(), timeout=2)
    deadline, cancelled = time.monotonic() + 15, 0.0
    while time.monotonic() < deadline and cancelled < 1:
        metrics = httpx.get(f"{guarded}/metrics").text
        cancelled = max([float(line.split()[-1]) for line in metrics.splitlines()
                         if line.startswith("peft_adapt_generations_cancelled ")] or [0.0])
        time.sleep(0.2)
    assert cancelled >= 1  # stopped within 15 s of a 20 s run: the batcher is free again


def _cancelled(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics").text
    return max([float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("peft_adapt_generations_cancelled ")] or [0.0])


def test_a_short_request_is_answered_while_a_long_one_streams(guarded):
    """Continuous batching through the server: a 3-token request sent while a 400-token one streams joins the
    running batch and is answered while the long one still runs (closing the long one then cancels it; under
    whole-request scheduling the short one waited for the long one's end, and there was nothing left to cancel)."""
    import time

    before = _cancelled(guarded)
    long = {"model": "a", "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
    short = {"model": "a", "prompt": "def", "max_tokens": 3, "temperature": 0}
    with httpx.stream("POST", f"{guarded}/v1/completions", json=long, headers=_auth(), timeout=60) as streamed:
        lines = streamed.iter_lines()  # held: a dropped line iterator closes the response
        while not next(lines).startswith("data: "):  # until the long one is decoding
            pass
        answer = httpx.post(f"{guarded}/v1/completions", json=short, headers=_auth(), timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
        assert _cancelled(guarded) == before  # the long one runs on
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _cancelled(guarded) <= before:
        time.sleep(0.2)
    assert _cancelled(guarded) == before + 1  # the long one was still running when the short one was answered


# ---- item 6: slow clients


def _closed_within(sock, seconds: float, trickle: bytes = b"") -> bool:
    """True once the server closes `sock` (recv gives b"" or a reset) within `seconds`, while sending `trickle`
    every 0.3 s (a header line at a time, as a slowloris client does)."""
    import socket
    import time

    deadline = time.monotonic() + seconds
    sock.settimeout(min(0.3, seconds))
    while time.monotonic() < deadline:
        try:
            if trickle:
                sock.sendall(trickle)
            if sock.recv(1024) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:  # reset, or a send on a closed socket
            return True
    return False


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tiny_llama):
    registry = Registry(tmp_path_factory.mktemp("guarded") / "reg")
    registry.import_peft(make_lora(tiny_llama, registry.root.parent / "a", 4, ["q_proj"], seed=0), base=str(tiny_llama),
                         name="a")
    proc, url = _start(tiny_llama, registry.root, "--header-timeout", "3", "--body-timeout", "3",
                       "--max-connections-per-peer", "8", "--max-connections", "64", "--max-tokens", "400",
                       env={"PEFT_ADAPT_DELAY_AT": "decode_step", "PEFT_ADAPT_DELAY_S": "0.05"})  # slow decoding
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _connect(url: str, source: str = "127.0.0.1"):
    import socket

    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect((host, int(port)))
    return sock


def test_a_client_trickling_its_headers_is_dropped_at_the_header_deadline(guarded):
    sock = _connect(guarded)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    assert _closed_within(sock, 20, trickle=b"X-a: b\r\n")  # held for ever before
    sock.close()


def test_a_body_that_never_ends_is_dropped_at_the_body_deadline(guarded):
    sock = _connect(guarded)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\": ")
    assert _closed_within(sock, 20)
    sock.close()


def test_one_address_cannot_hold_every_connection(guarded):
    held = [_connect(guarded) for _ in range(8)]  # the peer's cap, idle (as half-open connections are)
    extra = _connect(guarded)
    assert _closed_within(extra, 10)  # refused at once, before it is read ...
    assert not any(_closed_within(sock, 0.02) for sock in held)  # ... not at the header deadline, which the older ones
    # would have reached first
    other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    assert other.get(f"{guarded}/health", timeout=10).status_code == 200  # another address is served meanwhile
    for sock in held + [extra]:
        sock.close()


def test_at_the_total_cap_a_new_client_is_served_and_the_oldest_waiting_connection_goes(guarded):
    held = [_connect(guarded, f"127.0.1.{1 + i // 8}") for i in range(64)]  # the total cap, 8 addresses x 8
    client = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.2.1"))
    assert client.get(f"{guarded}/health", timeout=10).status_code == 200
    assert _closed_within(held[0], 5) and not _closed_within(held[-1], 0.02)  # the oldest made room
    for sock in held:
        sock.close()


def test_echo_and_logprobs_are_the_runtimes_own_log_softmax(probed, tiny_llama):
    """What lm-evaluation-harness's loglikelihood asks a completions server for (issue 31)."""
    from peft_adapt import AdapterRuntime

    url, registry, _ = probed
    response = _complete(url, "code", max_tokens=3, logprobs=2, echo=True)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    runtime = AdapterRuntime(str(tiny_llama), quantization="none", registry=registry)
    prompt = runtime.tokenizer(PROMPT)["input_ids"]
    generated = runtime.generate([PROMPT], "code", max_new_tokens=3, return_tokens=True)[0]
    ids = prompt + generated
    expected = runtime.logits([ids], adapters="code")[0].float().log_softmax(-1)
    scores = choice["logprobs"]
    assert choice["text"].startswith(PROMPT) and len(scores["tokens"]) == len(ids)
    assert scores["token_logprobs"][0] is None and scores["top_logprobs"][0] is None
    for p in range(1, len(ids)):
        assert abs(scores["token_logprobs"][p] - float(expected[p - 1, ids[p]])) < 1e-4, p
        assert len(scores["top_logprobs"][p]) == 2
    for p in range(len(prompt), len(ids)):  # greedy: each generated token is the top alternative
        assert max(scores["top_logprobs"][p].values()) == pytest.approx(scores["token_logprobs"][p], abs=1e-6)
    plain = _complete(url, "code", max_tokens=3, logprobs=0)
    assert plain.status_code == 200 and len(plain.json()["choices"][0]["logprobs"]["tokens"]) == 3
    _error(_complete(url, "code", logprobs=1, stream=True), 400, "without stream")
    from openai import OpenAI  # the official client reads them as it reads OpenAI's

    client = OpenAI(base_url=f"{url}/v1", api_key="test-key")
    read = client.completions.create(model="code", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True)
    assert read.choices[0].logprobs.token_logprobs == scores["token_logprobs"]
    assert read.choices[0].logprobs.tokens == scores["tokens"]


def test_stream_options_include_usage_ends_the_stream_with_the_counts(probed):
    from openai import OpenAI

    url, _, _ = probed
    client = OpenAI(base_url=f"{url}/v1", api_key="test-key")
    chunks = list(client.completions.create(model="code", prompt=PROMPT, max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    whole = client.completions.create(model="code", prompt=PROMPT, max_tokens=4, temperature=0)
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.completions.create(model="code", prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
    assert all(c.usage is None for c in plain)


def test_chat_logprobs_are_the_runtimes_own_log_softmax_of_the_answer(probed, tiny_llama):
    from openai import OpenAI

    from peft_adapt import AdapterRuntime
    from peft_adapt.server.generation import chat_prompt

    url, registry, _ = probed
    client = OpenAI(base_url=f"{url}/v1", api_key="test-key")
    messages = [{"role": "user", "content": "def add(a, b):"}]
    answer = client.chat.completions.create(model="code", messages=messages, max_tokens=3, temperature=0,
                                            logprobs=True, top_logprobs=2)
    content = answer.choices[0].logprobs.content
    runtime = AdapterRuntime(str(tiny_llama), quantization="none", registry=registry)
    prompt = runtime.tokenizer(chat_prompt(runtime.tokenizer, messages))["input_ids"]
    generated = runtime.generate([prompt], "code", max_new_tokens=3, return_tokens=True)[0]
    expected = runtime.logits([prompt + generated], adapters="code")[0].float().log_softmax(-1)
    assert len(content) == len(generated)
    for k, (token, item) in enumerate(zip(generated, content)):
        assert abs(item.logprob - float(expected[len(prompt) + k - 1, token])) < 1e-4
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-6)
    plain = client.chat.completions.create(model="code", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None
    _error(_post(url, "/v1/chat/completions", {"model": "code", "messages": messages, "top_logprobs": 2}), 400,
           "top_logprobs needs logprobs")
