"""The server under abuse, against real servers in subprocesses: random paths, streamed oversize bodies, folders that
look like adapters, client mistakes, and several processes on one registry."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
from test_runtime import make_lora
from test_server import ADMIN, _auth, _error, _start

from peft_adapt import AdapterRuntime, Registry

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("hardening")
    return [make_lora(tiny_llama, root / f"lora{i}", 4 + 2 * i, ["q_proj", "v_proj", "down_proj"], seed=40 + i)
            for i in range(3)]


@pytest.fixture(scope="module")
def expected(tiny_llama, adapters):
    """Greedy continuations of PROMPT by each adapter folder (and the base), computed in this process."""
    runtime = AdapterRuntime(str(tiny_llama), quantization="none")
    for folder in adapters:
        runtime.load(str(folder))
    texts = {i: runtime.generate([PROMPT], [str(folder)], max_new_tokens=6)[0] for i, folder in enumerate(adapters)}
    texts["base"] = runtime.generate([PROMPT], [None], max_new_tokens=6)[0]
    assert len(set(texts.values())) == len(texts), texts  # every adapter answers differently
    return texts


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama, adapters):
    root = tmp_path_factory.mktemp("hardened-server")
    registry = Registry(root / "reg")
    registry.import_peft(adapters[0], base=str(tiny_llama), name="code")
    workdir = root / "work"
    (workdir / "code").mkdir(parents=True)  # a folder named like the adapter, in the server's working directory
    shutil.copytree(adapters[1], workdir / "code", dirs_exist_ok=True)
    proc, url = _start(tiny_llama, registry.root, "--max-tokens", "64", cwd=workdir)
    yield url, registry
    proc.terminate()
    proc.wait(timeout=30)


def _complete(url: str, model: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0} | extra
    return httpx.post(f"{url}/v1/completions", json=body, headers=_auth(), timeout=60)


def test_random_paths_do_not_grow_metrics(server):
    url, _ = server
    size_before = len(httpx.get(f"{url}/metrics").text)
    with httpx.Client() as client:
        for _ in range(400):
            client.get(f"{url}/{uuid.uuid4().hex}/{uuid.uuid4().hex}")
            client.post(f"{url}/v1/{uuid.uuid4().hex}", json={})
    text = httpx.get(f"{url}/metrics").text
    assert 'route="unmatched"' in text
    assert len(text) < size_before + 3000, (size_before, len(text))  # 800 new paths, a few new samples at most


def test_a_streamed_oversize_body_is_refused_while_it_arrives(server):
    url, _ = server
    sent = 0

    def chunks():
        nonlocal sent
        for _ in range(128):  # 8 MB in 64 KB chunks, no Content-Length
            sent += 65536
            yield b" " * 65536

    try:
        response = httpx.post(f"{url}/v1/completions", content=chunks(), headers=_auth() | {"content-type": "application/json"},
                              timeout=60)
        _error(response, 413, "exceeds the limit of 1000000 bytes")
    except httpx.HTTPError:  # the server may close the connection before the client stops sending
        pass
    assert _complete(url, "code").status_code == 200


def test_tokenizing_a_long_prompt_does_not_block_the_event_loop(server):
    url, _ = server
    big = {"model": "code", "prompt": "word " * 190_000, "max_tokens": 1}  # just under the body limit
    done = threading.Event()

    def post_big():
        httpx.post(f"{url}/v1/completions", json=big, headers=_auth(), timeout=120)
        done.set()

    thread = threading.Thread(target=post_big)
    thread.start()
    slowest = 0.0
    while not done.is_set():
        started = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        slowest = max(slowest, time.perf_counter() - started)
        time.sleep(0.02)
    thread.join()
    assert slowest < 1.0, slowest


def test_registered_names_come_first_and_requests_never_name_folders(server, expected, tmp_path, adapters):
    url, _ = server
    assert _complete(url, "code").json()["choices"][0]["text"] == expected[0]  # not the folder ./code beside it
    for path in ("./code", str(adapters[1]), "../work/code", "/etc"):
        _error(_complete(url, path), 404, "does not exist")


def test_client_mistakes_are_400s_not_500s(server):
    url, _ = server
    post = lambda body: httpx.post(f"{url}/v1/completions", json=body, headers=_auth(), timeout=60)  # noqa: E731
    good = {"model": "code", "prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    _error(post(good | {"seed": 2**70}), 400, "seed")
    _error(post(good | {"seed": -(2**70)}), 400, "seed")
    _error(post(good | {"prompt": []}), 400, "prompt")
    _error(post(good | {"prompt": [], "stream": True}), 400, "prompt")
    _error(post(good | {"stop": ["a", "b", "c", "d", "e"]}), 400, "stop")
    bad_json = httpx.post(f"{url}/v1/completions", content=b'{"model": "code", "prompt": oops}', timeout=60,
                          headers=_auth() | {"content-type": "application/json"})
    error = _error(bad_json, 400, "the request body is not valid JSON (at character")
    assert error["param"] is None
    chat = httpx.post(f"{url}/v1/chat/completions", headers=_auth(), timeout=60,
                      json={"model": "code", "messages": [{"role": "user", "content": "hi"}], "temperature": 0})
    assert chat.status_code == 200, chat.text  # no max_tokens: capped by the server's --max-tokens 64, not refused
    assert chat.json()["usage"]["completion_tokens"] <= 64


def test_keys_are_checked_before_a_body_is_read(server):
    url, _ = server
    response = httpx.post(f"{url}/v1/completions", content=b"x" * 900_000, timeout=60)
    _error(response, 401, "missing or wrong API key")
    _error(httpx.post(f"{url}/v1/adapters/load", json={"name": "code"}, headers=_auth()), 401, "admin key")
    loaded = httpx.post(f"{url}/v1/adapters/load", json={"name": "code"}, headers=_auth(ADMIN))
    assert loaded.status_code == 200 and loaded.json()["loaded"] == "code"
    _error(httpx.post(f"{url}/v1/adapters/load", json={"name": "/etc"}, headers=_auth(ADMIN)), 404, "does not exist")


def test_two_servers_and_a_cli_writer_agree_within_one_request(tmp_path, tiny_llama, adapters, expected):
    registry = Registry(tmp_path / "reg")
    registry.import_peft(adapters[0], base=str(tiny_llama), name="code")
    servers = [_start(tiny_llama, registry.root) for _ in range(2)]
    cli = [sys.executable, "-m", "peft_adapt.cli", "registry", "--registry", str(registry.root)]
    try:
        urls = [url for _, url in servers]
        for url in urls:
            assert _complete(url, "code").json()["choices"][0]["text"] == expected[0]
        done = subprocess.run([*cli, "import", str(adapters[2]), "--base", str(tiny_llama), "--name", "code"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        for url in urls:  # a bare name now means version 2, on both, at the very next request
            assert _complete(url, "code").json()["choices"][0]["text"] == expected[2]
            assert _complete(url, "code@1").json()["choices"][0]["text"] == expected[0]  # a pinned version keeps its bytes
        done = subprocess.run([*cli, "rm", "code@1"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        for url in urls:
            _error(_complete(url, "code@1"), 404, "does not exist")
            assert _complete(url, "code").json()["choices"][0]["text"] == expected[2]
        done = subprocess.run([*cli, "rm", "code", "--all-versions"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        for url in urls:
            _error(_complete(url, "code"), 404, "does not exist")
            assert _complete(url, "base").json()["choices"][0]["text"] == expected["base"]
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.mark.parametrize("where", ["generation", "models"])
def test_a_5xx_is_logged_with_its_traceback_and_answered_without_it(tmp_path, tiny_llama, where):
    proc, url = _start(tiny_llama, Registry(tmp_path / "reg").root, env={"PEFT_ADAPT_FAULT": where})
    try:
        if where == "generation":
            response = _complete(url, "base")
            streamed = httpx.post(f"{url}/v1/completions", headers=_auth(), timeout=60,
                                  json={"model": "base", "prompt": PROMPT, "max_tokens": 3, "stream": True})
            _error(streamed, 500, "generation failed")
        else:
            response = httpx.get(f"{url}/v1/models", headers=_auth(), timeout=60)
        _error(response, 500, "failed" if where == "generation" else "internal server error")
        assert httpx.get(f"{url}/health").status_code == 200  # and it keeps serving
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = proc.log_path.read_text()
    assert "Traceback" in log and f"injected fault at {where}" in log, log[-2000:]


def test_server_settings_never_show_a_key_in_a_log_line():
    """`serve --ray -v` logged its settings, keys included (issue 30, item 5)."""
    from peft_adapt.server.schemas import ServerSettings

    shown = str(ServerSettings("base", api_key="K-secret-1", admin_key="A-secret-2").loggable())
    assert "K-secret-1" not in shown and "A-secret-2" not in shown and "'api_key': '<set>'" in shown
    assert ServerSettings("base").loggable()["api_key"] is None
