"""`peft-adapt serve --ray`: a local Ray cluster with 2 server replicas on the CPU, started by the command itself.
Requests for 4 adapters are answered as one server answers them, and land on replicas by adapter."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from test_runtime import make_lora
from test_server import KEY, PROMPTS, _auth, _free_port

from peft_adapt import AdapterRuntime, Registry


@pytest.fixture(scope="module")
def ray_served(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("ray")
    registry = Registry(root / "reg")
    for i, (rank, targets) in enumerate([(4, ["q_proj", "v_proj"]), (8, ["o_proj", "down_proj"]),
                                         (2, ["up_proj"]), (6, ["q_proj", "k_proj"])]):
        registry.import_peft(make_lora(tiny_llama, root / f"a{i}", rank, targets, seed=10 + i),
                             base=str(tiny_llama), name=f"ad{i}")
    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix="ray-server-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "peft_adapt.cli", "serve", "--ray", "--replicas", "2", "--base", str(tiny_llama),
               "--quantization", "none", "--registry", str(root / "reg"), "--port", str(port), "--api-key", KEY,
               "--max-body-bytes", "20000"]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the Ray server did not come up: {Path(log.name).read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    yield url, AdapterRuntime(str(tiny_llama), quantization="none", registry=registry)
    proc.terminate()  # the command shuts down Serve and the cluster it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


def _complete(url: str, model: str, prompt: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", headers=_auth(), timeout=120,
                      json={"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, **extra})


def test_four_adapters_over_two_replicas_are_answered_right_and_routed_by_adapter(ray_served):
    url, runtime = ray_served
    served = collections.defaultdict(set)  # adapter -> the replicas that have answered for it
    landed = []
    for round_ in range(3):
        for a in range(4):
            for p in range(2):
                response = _complete(url, f"ad{a}", PROMPTS[p])
                assert response.status_code == 200, response.text
                expected = runtime.generate([PROMPTS[p]], adapters=f"ad{a}", max_new_tokens=6)[0]
                assert response.json()["choices"][0]["text"] == expected, (a, p)
                replica = response.headers["x-peft-adapt-replica"]
                if round_:  # after the first round every adapter is held somewhere
                    landed.append((f"ad{a}", replica in served[f"ad{a}"]))
                served[f"ad{a}"].add(replica)
            if round_ == 0:
                # Ray learns which replica holds what from the replicas' reports (pushed every 0.1 s, relayed by its
                # controller); a request for an adapter no replica holds goes to the replica holding fewest. Waiting
                # for the report makes the first round follow that rule (2 adapters on each replica)
                time.sleep(1)
    # every later request lands on a replica that already holds its adapter
    assert [adapter for adapter, held in landed if not held] == [], dict(served)
    assert len(set().union(*served.values())) == 2, "both replicas should serve"


def test_the_door_and_the_stream_hold_on_ray(ray_served):
    url, runtime = ray_served
    assert httpx.post(f"{url}/v1/completions", json={"model": "ad0", "prompt": "x"}).status_code == 401
    too_big = httpx.post(f"{url}/v1/completions", headers=_auth(), content=b"{" + b" " * 30000 + b"}")
    assert too_big.status_code == 413 and "exceeds the limit" in too_big.json()["error"]["message"]
    unknown = _complete(url, "no-such-adapter", "x")
    assert unknown.status_code == 404 and "no-such-adapter" in unknown.json()["error"]["message"]
    with httpx.stream("POST", f"{url}/v1/completions", headers=_auth(), timeout=120,
                      json={"model": "ad1", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0,
                            "stream": True}) as streamed:
        assert streamed.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json

    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == runtime.generate([PROMPTS[1]], adapters="ad1", max_new_tokens=6)[0]
