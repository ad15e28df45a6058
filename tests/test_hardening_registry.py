"""What an attacker's files and an operator's URLs do to the registry (issue 30): passwords in URLs, manifests that
name files outside their folder, hard links, malformed routing signatures, registry outages. Real files, a real
PostgreSQL server and a real S3-compatible server where the shared registry is involved."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_runtime import make_lora

from peft_adapt import Registry, UserInputError
from peft_adapt.routing.router import SIGNATURE, write_signature

SECRET = "S3cret-pw"


@pytest.mark.parametrize("url", [
    f"postgresql://me:{SECRET}@db.example/adapters",
    f"postgresql://me:{SECRET}#x@db.example/adapters",  # '#' not %-encoded: urlsplit reads a fragment
    f"postgresql://me:{SECRET}/x@db.example/adapters",  # '/' not %-encoded: urlsplit reads a path
    f"postgresql://me:{SECRET}@x@db.example:5432/adapters",
    f"postgresql://me@db.example/adapters?password={SECRET}&sslmode=require",
    f"postgresql://db.example/adapters?sslmode=require&sslpassword={SECRET}",
    f"postgresql:///adapters?host=/tmp&password={SECRET}%23x",
    f"host=db.example password='{SECRET} x' dbname=adapters",
])
def test_every_password_spelling_is_redacted(url):
    from peft_adapt.registry.index import redact, scrub

    shown = redact(url)
    assert SECRET not in shown and "***" in shown, shown
    assert SECRET not in scrub(f"driver says: could not parse {url!r}", url)


def test_registry_list_and_a_failed_connection_never_print_the_password(tmp_path, team, trained_adapter, capsys,
                                                                        caplog):
    from peft_adapt.errors import ServiceUnavailable

    leaky = f"{team.location}&password={SECRET}"  # the test server trusts local connections: any password opens it
    registry = Registry(leaky, store=team.store, cache=team.cache)
    registry.add(trained_adapter)
    from peft_adapt.cli.main import main

    for argv in (["-v", "registry", "list"], ["-v", "registry", "show", "t-docs"], ["registry", "rm", "nosuch", "--all-versions"],
                 ["registry", "show", "nosuch"]):  # in this process, its log captured too
        main([argv[0], *argv[1:2], "--registry", leaky, "--store", team.store, *argv[2:]] if argv[0] == "-v" else
             [argv[0], "--registry", leaky, "--store", team.store, *argv[1:]])
        out = capsys.readouterr()
        shown = out.out + out.err + caplog.text
        assert SECRET not in shown, (argv, shown)
        if "nosuch" in argv:
            assert "password=***" in shown, shown  # the location is named, without its password
    down = leaky.replace("/t_", "/nosuch_")  # a database that is not there: the connection fails
    with pytest.raises(ServiceUnavailable) as failed:
        Registry(down, store=team.store, cache=team.cache).list()
    assert SECRET not in str(failed.value) and "nosuch_" in str(failed.value)
    assert "nosuch_" not in failed.value.public and SECRET not in failed.value.public


def _folder_with_manifest_files(tmp_path: Path, trained_adapter: Path, files: dict) -> Path:
    import shutil

    folder = tmp_path / "evil"
    shutil.copytree(trained_adapter, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] |= files
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("outside", ["/etc/hostname", "../../../../etc/hostname", "/proc/self/fd/0", "a/../../x"])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused_before_it_is_opened(tmp_path, trained_adapter,
                                                                                    outside, monkeypatch):
    from peft_adapt.formats import manifest as manifest_module

    opened = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda p: opened.append(str(p)) or real(p))
    folder = _folder_with_manifest_files(tmp_path, trained_adapter, {outside: "0" * 64})
    with pytest.raises(UserInputError, match="outside its folder") as refused:
        Registry(tmp_path / "reg").add(folder)
    assert opened == [] and "sha256" not in str(refused.value)


def test_a_hard_link_to_a_file_elsewhere_is_not_copied_into_the_registry(tmp_path, trained_adapter):
    import shutil

    folder = tmp_path / "linked"
    shutil.copytree(trained_adapter, folder)
    secret = tmp_path / "secret.txt"
    secret.write_text("not an adapter's")
    (folder / "README.md").unlink()
    os.link(secret, folder / "README.md")
    registry = Registry(tmp_path / "reg")
    with pytest.raises(UserInputError, match="hard links"):
        registry.add(folder)
    assert registry.list() == []


@pytest.mark.parametrize("bad", ["3-d", "few-rows", "nan", "layer-abc", "int-dtype", "extra-tensor"])
def test_a_malformed_signature_is_refused_where_it_is_added(tmp_path, tiny_llama, bad):
    from safetensors.torch import save_file

    registry = Registry(tmp_path / "reg")
    registry.import_peft(make_lora(tiny_llama, tmp_path / "a", 4, ["q_proj"], seed=0), base=str(tiny_llama),
                         name="a")
    features = {"3-d": torch.randn(16, 4, 16), "few-rows": torch.randn(3, 64), "nan": torch.full((16, 64), float("nan")),
                "int-dtype": torch.ones(16, 64, dtype=torch.int32)}.get(bad, torch.randn(16, 64))
    tensors = {"features": features} | ({"other": torch.zeros(1)} if bad == "extra-tensor" else {})
    path = tmp_path / SIGNATURE
    save_file(tensors, str(path), metadata={"layer": "abc" if bad == "layer-abc" else "0", "tokens": "8"})
    with pytest.raises(UserInputError, match="not a routing signature"):
        registry.add_files("a", {SIGNATURE: path})
    assert [e.version for e in registry.list()] == [1]
    write_signature(tmp_path, torch.randn(16, 64), 0, 8.0)  # a good one is taken
    assert registry.add_files("a", {SIGNATURE: path}).version == 2


def test_the_expanded_distance_equals_the_direct_one():
    from peft_adapt.routing.router import _Discriminant

    torch.manual_seed(0)
    samples = [torch.randn(40, 24) + shift for shift in (-2.0, 0.0, 3.0)]
    fitted = _Discriminant(samples, 0.2)
    x = torch.randn(50, 24) * 3
    diff = x.double().unsqueeze(1) - fitted.means.unsqueeze(0)
    direct = torch.einsum("rdh,hk,rdk->rd", diff, fitted.precision, diff)
    assert torch.allclose(fitted.distances(x), direct, rtol=1e-9, atol=1e-9)


def test_the_ray_front_reads_no_model_from_a_deeply_nested_body():
    from peft_adapt.server.ray_serve import _requested_adapter

    assert _requested_adapter(b"[" * 40_000 + b"]" * 40_000) == ""
    assert _requested_adapter(b'{"model": "code", "x": ' + b"[" * 40_000 + b"]" * 40_000 + b"}") == ""
    assert _requested_adapter(b'{"model": "code"}') == "code"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_store_that_is_down_is_one_line_for_the_cli_and_a_503_for_a_client(tmp_path, team, trained_adapter,
                                                                              tiny_llama):
    import httpx
    from test_server import _auth, _start

    team.open().add(trained_adapter)
    env = team.env | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}", "AWS_MAX_ATTEMPTS": "1",
                      "PEFT_ADAPT_CACHE": str(tmp_path / "cold-cache")}
    done = subprocess.run([sys.executable, "-m", "peft_adapt.cli", "registry", "verify"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "object store" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    proc, url = _start(tiny_llama, team.location, "--store", team.store, env=env)
    try:
        body = {"model": "t-docs", "prompt": "def add(a, b):", "max_tokens": 2}
        response = httpx.post(f"{url}/v1/completions", json=body, headers=_auth(), timeout=120)
        assert response.status_code == 503 and int(response.headers["retry-after"]) > 0, response.text
        for private in (team.store, team.store.split("/")[2], "127.0.0.1", str(tmp_path)):
            assert private not in response.text, (private, response.text)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
