"""The HTTP server, started for real on 127.0.0.1 in a subprocess, called with the openai client and plain HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_runtime import make_lora

from peft_adapt import AdapterRuntime, Registry

KEY, ADMIN = "test-key", "admin-key"
PROMPTS = ["def add(a, b):", "The function returns", "import os", "class Point:"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(base: Path, registry: Path, *extra: str, cwd: Path | None = None, env: dict | None = None
           ) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, "-m", "peft_adapt.cli", "serve", "--base", str(base), "--quantization", "none",
               "--registry", str(registry), "--port", str(port), "--api-key", KEY, "--admin-key", ADMIN, *extra]
    log = tempfile.NamedTemporaryFile(prefix="server-", suffix=".log", delete=False)  # a pipe nobody reads could fill
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}))
    proc.log_path = Path(log.name)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not come up in 120 s")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("server")
    registry = Registry(root / "reg")
    for i, (rank, targets) in enumerate([(4, ["q_proj", "v_proj"]), (8, ["o_proj", "down_proj"]),
                                         (2, ["up_proj"]), (6, ["q_proj", "k_proj"])]):
        registry.import_peft(make_lora(tiny_llama, root / f"a{i}", rank, targets, seed=10 + i),
                             base=str(tiny_llama), name=f"ad{i}")
    proc, url = _start(tiny_llama, registry.root, "--adapters", "ad0", "--max-batch", "64", "--batch-window-ms", "20")
    runtime = AdapterRuntime(str(tiny_llama), quantization="none", registry=registry)
    yield url, runtime, registry, tiny_llama
    proc.terminate()
    proc.wait(timeout=30)


def _client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def _auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_completions_match_the_runtime_for_each_adapter(served):
    url, runtime, _, _ = served
    client = _client(url)
    for model in ["ad0", "ad1", "base"]:
        response = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        expected = runtime.generate([PROMPTS[0]], adapters=None if model == "base" else model, max_new_tokens=8)[0]
        assert response.choices[0].text == expected
        assert response.usage.completion_tokens >= 1


def test_streaming_gives_the_same_text_as_one_response(served):
    url, runtime, _, _ = served
    client = _client(url)
    pieces = [c.choices[0].text for c in client.completions.create(model="ad1", prompt=PROMPTS[1], max_tokens=10,
                                                                   temperature=0, stream=True)]
    assert "".join(pieces) == runtime.generate([PROMPTS[1]], adapters="ad1", max_new_tokens=10)[0]
    messages = [{"role": "user", "content": "Say something about Python."}]
    whole = client.chat.completions.create(model="ad2", messages=messages, max_tokens=8, temperature=0)
    streamed = client.chat.completions.create(model="ad2", messages=messages, max_tokens=8, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content
    from peft_adapt.server import chat_prompt

    prompt = chat_prompt(runtime.tokenizer, messages)
    assert whole.choices[0].message.content == runtime.generate([prompt], adapters="ad2", max_new_tokens=8)[0]


def test_64_concurrent_requests_over_4_adapters_each_get_their_own_answer(served):
    url, runtime, _, _ = served
    expected = {(a, p): runtime.generate([PROMPTS[p]], adapters=f"ad{a}", max_new_tokens=6)[0]
                for a in range(4) for p in range(4)}

    def batches() -> float:
        lines = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith("peft_adapt_batch_size_count")]
        return float(lines[0].split()[-1])

    before = batches()

    def ask(i: int):
        a, p = i % 4, (i // 4) % 4
        r = httpx.post(f"{url}/v1/completions", headers=_auth(), timeout=120, json={
            "model": f"ad{a}", "prompt": PROMPTS[p], "max_tokens": 6, "temperature": 0})
        return (a, p), r.status_code, r.json()

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(ask, range(64)))
    assert all(status == 200 for _, status, _ in results), [r for r in results if r[1] != 200][:2]
    for key, _, body in results:
        assert body["choices"][0]["text"] == expected[key], key
    assert batches() - before < 32  # requests for different adapters ran together: far fewer batches than requests


def _error(response: httpx.Response, status: int, text: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert text in body["error"]["message"], body
    assert "Traceback" not in response.text
    return body["error"]


def test_every_error_comes_back_in_openai_shape_and_the_server_keeps_serving(served):
    url, _, _, base = served
    post = lambda path, body, headers=None: httpx.post(f"{url}{path}", json=body, headers=headers or _auth(), timeout=60)  # noqa: E731
    good = {"model": "ad0", "prompt": "hello", "max_tokens": 3, "temperature": 0}
    checks = [
        (post("/v1/completions", good | {"model": "nope"}), 404, "available: base, tiny-llama, ad0, ad1, ad2, ad3"),  # the base by its name, not its path
        (post("/v1/completions", {"model": "ad0"}), 400, "prompt"),
        (post("/v1/completions", good | {"max_tokens": 100000}), 400, "exceeds the limit"),
        (post("/v1/completions", good | {"n": 3}), 400, "n must be 1"),
        (post("/v1/completions", good | {"temperature": "hot"}), 400, "temperature"),
        (post("/v1/completions", good | {"prompt": "x " * 5000}), 400, "the limit is 512"),  # the base's positions
        (post("/v1/completions", good, {"Authorization": "Bearer wrong"}), 401, "wrong API key"),
        (httpx.post(f"{url}/v1/completions", json=good), 401, "missing or wrong API key"),
        (post("/v1/adapters/load", {"name": "ad1"}), 401, "admin key"),
        (post("/v1/adapters/unload", {"name": "never-loaded"}, _auth(ADMIN)), 404, "not resident"),
        (post("/v1/classify", {"model": "ad0", "input": "x"}), 400, "causal LM base"),
        (httpx.post(f"{url}/v1/completions", content=b"{not json", headers=_auth() | {"content-type": "application/json"}),
         400, ""),
        (httpx.post(f"{url}/v1/completions", content=b"x" * 2_000_000, headers=_auth()), 413, "exceeds the limit"),
    ]
    for response, status, text in checks:
        _error(response, status, text)
        ok = post("/v1/completions", good)  # still serving after each bad request
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_models_health_metrics_and_adapter_management(served):
    url, runtime, _, base = served
    models = httpx.get(f"{url}/v1/models", headers=_auth()).json()
    assert [m["id"] for m in models["data"]] == [base.name, "ad0", "ad1", "ad2", "ad3"]  # never the base's path
    loaded = httpx.post(f"{url}/v1/adapters/load", json={"name": "ad3", "pin": True}, headers=_auth(ADMIN)).json()
    assert loaded["loaded"] == "ad3" and loaded["pinned"]
    assert "ad3" in httpx.get(f"{url}/health").json()["resident"]
    assert httpx.post(f"{url}/v1/adapters/unload", json={"name": "ad3"}, headers=_auth(ADMIN)).json() == {"unloaded": "ad3"}
    assert "ad3" not in httpx.get(f"{url}/health").json()["resident"]
    text = httpx.get(f"{url}/metrics").text
    for name in ("peft_adapt_requests_total", "peft_adapt_request_seconds_bucket", "peft_adapt_batch_size_bucket",
                 "peft_adapt_adapter_hits", "peft_adapt_adapter_misses", "peft_adapt_adapter_evictions"):
        assert name in text, name


def test_a_full_queue_answers_429(tmp_path, tiny_llama):
    registry = Registry(tmp_path / "reg")
    proc, url = _start(tiny_llama, registry.root, "--max-queue", "1", "--max-batch", "1", "--batch-window-ms", "0")
    try:
        def ask(_):
            return httpx.post(f"{url}/v1/completions", headers=_auth(), timeout=120,
                              json={"model": "base", "prompt": "hello there", "max_tokens": 200, "temperature": 0})

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(ask, range(12)))
        codes = sorted(r.status_code for r in responses)
        assert 429 in codes and 200 in codes, codes
        _error(next(r for r in responses if r.status_code == 429), 429, "queue is full")
        assert ask(0).status_code == 200  # and it serves again once the queue drains
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_classification_server(tmp_path, tiny_bert, tiny_llama, sentiment_file):
    from conftest import classification_recipe

    from peft_adapt import parse_recipe, train_domain

    registry = Registry(tmp_path / "reg")
    result = train_domain(parse_recipe(classification_recipe(tiny_bert, sentiment_file, max_steps=10)), "sentiment", tmp_path)
    registry.add(result.out_dir, name="sentiment")
    registry.import_peft(make_lora(tiny_llama, tmp_path / "lm", 4, ["q_proj"], seed=0), base=str(tiny_llama), name="lm")
    proc, url = _start(tiny_bert, registry.root)
    try:
        listed = [m["id"] for m in httpx.get(f"{url}/v1/models", headers=_auth()).json()["data"]]
        assert listed == [tiny_bert.name, "sentiment"]  # not the causal LM adapter of another base
        texts = ["good great fine", "awful broken sad"]
        body = httpx.post(f"{url}/v1/classify", headers=_auth(), json={"model": "sentiment", "input": texts}).json()
        runtime = AdapterRuntime(str(tiny_bert), task="classification", quantization="none", registry=registry)
        expected = runtime.classify(texts, "sentiment")
        assert [d["label"] for d in body["data"]] == [e["label"] for e in expected]
        _error(httpx.post(f"{url}/v1/completions", headers=_auth(), json={"model": "sentiment", "prompt": "x"}), 400,
               "classification base")
    finally:
        proc.terminate()
        proc.wait(timeout=30)

