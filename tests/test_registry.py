"""The registry: bit-identical round trips, concurrent writers, crash safety, the wrong-base guard, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from peft_adapt import Registry, UserInputError
from peft_adapt.cli.main import main
from peft_adapt.models.backbone import BaseSpec, load_backbone
from peft_adapt.runtime.loading import load_registered
from peft_adapt.testing.tiny_models import build_tiny_model


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _snapshot(registry: Registry) -> tuple:
    """Everything a user could observe: the index and every stored byte (under adapters/, or every blob)."""
    entries = [(e.ref, tuple(e.tags)) for e in registry.list()]
    if registry.shared:
        fs = registry.objects.fs
        fs.invalidate_cache()
        files = {p: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in sorted(fs.find(registry.objects.prefix))}
        return entries, files
    files = {str(p.relative_to(registry.root)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((registry.root / "adapters").rglob("*")) if p.is_file()}
    return entries, files


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])


def test_round_trip_is_bit_identical(tmp_path, trained_adapter, backend):
    registry = backend.open()
    entry = registry.add(trained_adapter, tags=["prod"])
    assert (entry.name, entry.version, entry.tags) == ("t-docs", 1, ["prod"])
    exported = registry.export("t-docs@prod", tmp_path / "exported")
    source, stored, out = _tree_digest(trained_adapter), _tree_digest(entry.path), _tree_digest(exported)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert source[name] == stored[name] == out[name]
    assert stored["manifest.json"] == out["manifest.json"]
    original = json.loads((trained_adapter / "manifest.json").read_text())
    registered = json.loads((exported / "manifest.json").read_text())
    assert {k: v for k, v in registered.items() if k != "version"} == {k: v for k, v in original.items() if k != "version"}
    assert registered["version"] == 1
    # and what it computes is what the training folder computes
    from peft_adapt.runtime.loading import load_trained

    assert torch.equal(_logits(load_registered(registry, "t-docs").model, IDS), _logits(load_trained(trained_adapter).model, IDS))


def test_get_by_name_version_and_tag_and_list_filters(tmp_path, trained_adapter, backend):
    from types import SimpleNamespace

    registry = backend.open()
    registry.add(SimpleNamespace(out_dir=trained_adapter))  # a TrainResult names its folder as out_dir
    registry.add(trained_adapter, tags=["candidate"])
    registry.add(trained_adapter, name="other", domain="news")
    registry.tag("t-docs@1", "prod")
    assert registry.get("t-docs").version == 2
    assert registry.get("t-docs@1").tags == ["prod"]
    assert registry.get("t-docs@candidate").version == 2
    assert [e.ref for e in registry.list(domain="news")] == ["other@1"]
    assert [e.ref for e in registry.list(tag="prod")] == ["t-docs@1"]
    assert len(registry.list(method="lora")) == 3
    fingerprint = registry.get("other").fingerprint
    assert len(registry.list(base=fingerprint)) == 3
    registry.remove("t-docs@2")
    registry.add(trained_adapter)
    assert [e.version for e in registry.list(name="t-docs")] == [1, 3]  # versions are never reused


WRITER = """
import sys
from peft_adapt import Registry
registry = Registry()  # where: from the environment, as a team's machines would set it
for _ in range(int(sys.argv[2])):
    print(registry.add(sys.argv[1], name="shared").ref, flush=True)
"""


def test_four_processes_adding_25_each_end_with_100_entries(tmp_path, trained_adapter, backend):
    backend.open()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(trained_adapter), "25"], env=backend.env,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    refs = [ref for out in outputs for ref in out]
    assert len(refs) == len(set(refs)) == 100
    registry = backend.open()
    assert sorted(e.version for e in registry.list()) == list(range(1, 101))
    assert {e.ref for e in registry.list()} == set(refs)
    assert registry.verify().ok


LOOPING_WRITER = """
import sys
from peft_adapt import Registry
registry = Registry()
print("ready", flush=True)
while True:
    print("added", registry.add(sys.argv[1], name="crashy").ref, flush=True)
"""


def _assert_intact(registry: Registry, before: dict[str, dict]) -> None:
    report = registry.verify()
    assert report.ok, report.problems
    for ref, digest in before.items():
        assert _tree_digest(registry.get(ref).path) == digest, ref


@pytest.mark.parametrize("step", ["staged", "uploaded", "before_rename", "after_rename", "before_commit"])
def test_a_writer_killed_at_each_step_leaves_the_old_state(tmp_path, trained_adapter, step, backend):
    if step in (("before_rename", "after_rename") if backend.kind == "shared" else ("uploaded",)):
        pytest.skip(f"the {backend.kind} backend has no step {step!r}")
    registry = backend.open()
    registry.add(trained_adapter, name="crashy")
    before = {e.ref: _tree_digest(e.path) for e in registry.list()}
    env = backend.env | {"PEFT_ADAPT_CRASH_AT": step}
    code = "import sys; from peft_adapt import Registry; Registry().add(sys.argv[1], name='crashy')"
    proc = subprocess.run([sys.executable, "-c", code, str(trained_adapter)], env=env)
    assert proc.returncode == -signal.SIGKILL
    assert [e.ref for e in registry.list()] == ["crashy@1"]
    _assert_intact(registry, before)
    assert registry.add(trained_adapter, name="crashy").ref == "crashy@2"  # the next writer cleans up after it
    assert registry.verify().ok


def test_writers_killed_at_random_points_never_corrupt_the_registry(tmp_path, trained_adapter, backend):
    registry = backend.open()
    rng = random.Random(0)
    for trial in range(20):
        before = {e.ref: _tree_digest(e.path) for e in registry.list()}
        proc = subprocess.Popen([sys.executable, "-c", LOOPING_WRITER, str(trained_adapter)], env=backend.env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        if trial == 0:  # one add lands whatever the machine's speed; the kills below still fall anywhere in the next
            assert proc.stdout.readline().startswith("added ")
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _assert_intact(registry, before)
    assert registry.list(), "the writers should have landed some adapters"
    # every surviving adapter still loads and computes what the original folder computes
    from peft_adapt.runtime.loading import load_trained

    reference = _logits(load_trained(trained_adapter).model, IDS)
    for entry in registry.list()[:3] + registry.list()[-2:]:
        loaded = load_registered(registry, entry.ref)
        assert torch.equal(_logits(loaded.model, IDS), reference), entry.ref


# ---- the wrong-base guard


@pytest.fixture(scope="module")
def other_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {
        "architecture": build_tiny_model(root / "gpt2", "gpt2"),
        "vocabulary": build_tiny_model(root / "vocab", "llama", vocab_size=400),
        "weights": build_tiny_model(root / "seed1", "llama", seed=1),
    }


@pytest.mark.parametrize("difference, says", [
    ("architecture", "architecture: LlamaForCausalLM vs GPT2LMHeadModel"),
    ("vocabulary", "vocab_size: 320 vs"),
    ("weights", "weights: same shapes, different weight values"),
])
def test_wrong_base_guard_fires_and_names_both_bases(tmp_path, trained_adapter, other_bases, difference, says):
    registry = Registry(tmp_path / "reg")
    registry.add(trained_adapter)
    other = load_backbone(BaseSpec(model=str(other_bases[difference]), quantization="none"))
    with pytest.raises(UserInputError) as err:
        load_registered(registry, "t-docs", backbone=other)
    message = str(err.value)
    assert says in message
    assert str(other_bases[difference]) in message and "trained on base" in message
    if difference != "architecture":  # same layer shapes: forcing it loads
        load_registered(registry, "t-docs", backbone=other, force=True)


def test_wrong_base_guard_stays_quiet_for_the_same_base_in_another_quantization(tmp_path, trained_adapter, tiny_llama, caplog):
    registry = Registry(tmp_path / "reg")
    registry.add(trained_adapter)
    nf4 = load_backbone(BaseSpec(model=str(tiny_llama), quantization="nf4"))
    import logging

    with caplog.at_level(logging.INFO, logger="peft_adapt.runtime.loading"):
        loaded = load_registered(registry, "t-docs", backbone=nf4)
    assert "trained on a none base and runs on a nf4 base" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # it computes what plain peft computes with the same adapter on a fresh nf4 base
    from peft import PeftModel

    plain = PeftModel.from_pretrained(load_backbone(BaseSpec(model=str(tiny_llama), quantization="nf4")).model,
                                      registry.get("t-docs").path)
    assert torch.equal(_logits(loaded.model, IDS), _logits(plain, IDS))


# ---- bad input: a clear error, a non-zero exit, the registry unchanged


def _peft_adapter_without_manifest(base: Path, out: Path, r: int = 4) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(out)
    return out


def _broken(kind: str, trained_adapter: Path, tmp_path: Path) -> Path:
    folder = tmp_path / kind
    shutil.copytree(trained_adapter, folder)
    weights = folder / "adapter_model.safetensors"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif kind == "corrupt":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 64)
    elif kind == "checksum":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # one flipped bit in the last weight: the file is complete but not what was trained
        weights.write_bytes(bytes(data))
    elif kind == "no_config":
        (folder / "adapter_config.json").unlink()
    elif kind == "pickle":
        from safetensors.torch import load_file

        torch.save(load_file(weights), folder / "adapter_model.bin")
        weights.unlink()
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"] = {}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("kind, says", [
    ("truncated", "truncated safetensors file"),
    ("corrupt", "corrupt safetensors header"),
    ("checksum", "checksum mismatch"),
    ("no_config", "missing adapter_config.json"),
    ("pickle", r"pickle \(adapter_model.bin\).*allow_pickle"),
])
def test_bad_adapter_folders_are_refused_and_change_nothing(tmp_path, trained_adapter, capsys, kind, says, backend):
    registry = backend.open()
    registry.add(trained_adapter)
    before = _snapshot(registry)
    folder = _broken(kind, trained_adapter, tmp_path)
    with pytest.raises(UserInputError, match=says):
        registry.add(folder)
    code = main(["registry", *backend.cli, "add", str(folder)])
    assert code == 2 and "error:" in capsys.readouterr().err
    assert _snapshot(registry) == before
    assert registry.verify().ok and not registry.verify().orphans


def test_pickle_adapter_is_accepted_when_allowed_and_stored_as_safetensors(tmp_path, trained_adapter):
    registry = Registry(tmp_path / "reg")
    entry = registry.add(_broken("pickle", trained_adapter, tmp_path), allow_pickle=True)
    assert sorted(p.name for p in entry.path.glob("adapter_model.*")) == ["adapter_model.safetensors"]
    from peft_adapt.runtime.loading import load_trained

    assert torch.equal(_logits(load_registered(registry, entry.ref).model, IDS), _logits(load_trained(trained_adapter).model, IDS))


@pytest.mark.parametrize("name", ["a/b", "..", "x..y", "bad\x07name", "new\nline", "", "-leading"])
def test_unsafe_names_are_refused(tmp_path, trained_adapter, capsys, name):
    root = tmp_path / "reg"
    registry = Registry(root)
    before = _snapshot(registry)
    with pytest.raises(UserInputError, match="is not allowed"):
        registry.add(trained_adapter, name=name)
    assert main(["registry", "--registry", str(root), "add", str(trained_adapter), f"--name={name}"]) == 2
    assert _snapshot(registry) == before


def test_unknown_version_or_tag_is_named_with_what_exists(tmp_path, trained_adapter, capsys, backend):
    registry = backend.open()
    registry.add(trained_adapter, tags=["prod"])
    with pytest.raises(UserInputError, match=r"no version '7'; versions: 1; tags: prod"):
        registry.get("t-docs@7")
    assert main(["registry", *backend.cli, "show", "t-docs@beta"]) == 2
    assert "no tag 'beta'" in capsys.readouterr().err


def test_import_of_a_plain_peft_adapter_checks_it_fits_the_base(tmp_path, tiny_llama, other_bases, capsys):
    folder = _peft_adapter_without_manifest(tiny_llama, tmp_path / "plain")
    root = tmp_path / "reg"
    registry = Registry(root)
    entry = registry.import_peft(folder, base=str(tiny_llama), name="imported", domain="docs")
    assert entry.method == "lora" and entry.fingerprint == registry.get("imported").fingerprint
    loaded = load_registered(registry, "imported")  # onto the base it was imported against
    assert loaded.backbone.fingerprint["id"] == entry.fingerprint
    before = _snapshot(registry)
    with pytest.raises(UserInputError, match="does not fit the base") as err:
        registry.import_peft(folder, base=str(other_bases["architecture"]), name="misfit")
    layers = [part.split(" ")[0].rstrip(":") for part in str(err.value).split(": ", 1)[1].split("; ")]
    assert len(layers) == len(set(layers)), str(err.value)  # each layer named once, not once per matrix
    code = main(["registry", "--registry", str(root), "import", str(folder), "--base", str(other_bases["architecture"]),
                 "--name", "misfit"])
    assert code == 2 and "does not fit the base" in capsys.readouterr().err
    assert _snapshot(registry) == before


def test_verify_finds_a_file_changed_inside_the_registry(tmp_path, trained_adapter, capsys, backend):
    registry = backend.open()
    entry = registry.add(trained_adapter)
    if registry.shared:  # the stored copy changes (in the bucket): the cache fetched from it cannot be trusted either
        blob = registry.objects.blob(entry.manifest.files["adapter_model.safetensors"])
        data = bytearray(registry.objects.fs.cat_file(blob))
        data[-1] ^= 0x01
        registry.objects.fs.pipe_file(blob, bytes(data))
        registry = backend.open(cache=str(tmp_path / "another-machine"))
    else:
        weights = entry.path / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0x01
        weights.write_bytes(bytes(data))
    report = registry.verify()
    assert not report.ok and "t-docs@1" in report.problems[0] and ("does not match" in report.problems[0])
    assert main(["registry", *backend.cli, "verify"]) == 1
    with pytest.raises(UserInputError, match="checksum mismatch, refusing to load"):
        load_registered(registry, "t-docs")


def test_train_registers_every_adapter_and_list_json_shows_them(tmp_path, tiny_llama, docs_file, capsys):
    import yaml
    from conftest import causal_recipe

    data = causal_recipe(tiny_llama, docs_file, "none", max_steps=2)
    data["domains"]["code"] = {"train": str(docs_file)}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    root = tmp_path / "reg"
    assert main(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "runs"), "--registry", str(root)]) == 0
    capsys.readouterr()
    assert main(["registry", "--registry", str(root), "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(e["name"] for e in listed) == ["t-code", "t-docs"]
    for e in listed:
        for key in ("name", "version", "domain", "method", "base", "fingerprint", "created", "metrics"):
            assert key in e
        assert e["metrics"]["eval"]["perplexity"] > 1


def _ner_file(tmp_path: Path) -> Path:
    from conftest import write_jsonl

    rows = [{"tokens": [n, "lives", "in", p, "."], "tags": ["B-PER", "O", "O", "B-LOC", "O"]}
            for n, p in zip(["Alice", "Bob", "Carol", "Dave"] * 4, ["Paris", "Rome", "Oslo", "Lima"] * 4)]
    return write_jsonl(tmp_path / "ner.jsonl", rows)


_ADAPTER_SPECS = {"lora": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                  "bottleneck": {"method": "bottleneck", "reduction_factor": 8},
                  "prefix": {"method": "prefix", "num_virtual_tokens": 4},
                  "ia3": {"method": "ia3"}}


@pytest.mark.parametrize("method", ["lora", "bottleneck", "prefix", "ia3"])
@pytest.mark.parametrize("task", ["causal_lm", "classification", "token_classification"])
def test_export_then_import_then_load_computes_what_the_original_computes(tmp_path, tiny_llama, tiny_bert, docs_file,
                                                                          sentiment_file, task, method, capsys):
    from conftest import causal_recipe, classification_recipe

    from peft_adapt import parse_recipe, train_domain
    from peft_adapt.runtime.loading import load_trained

    if task == "causal_lm":
        data = causal_recipe(tiny_llama, docs_file, max_steps=2)
    elif task == "decoder_classification":
        data = classification_recipe(tiny_llama, sentiment_file, max_steps=3)
    else:
        data = classification_recipe(tiny_bert, sentiment_file if task == "classification" else _ner_file(tmp_path),
                                     max_steps=2)
        data["task"]["type"] = task
    data["adapter"] = _ADAPTER_SPECS[method]
    data["training"]["learning_rate"] = 1e-2
    result = train_domain(parse_recipe(data), next(iter(data["domains"])), tmp_path / "runs")
    first = Registry(tmp_path / "first")
    first.add(result.out_dir, name="shared-adapter")
    assert main(["registry", "export", "shared-adapter", "--out", str(tmp_path / "exported"),
                 "--registry", str(first.root)]) == 0  # --registry after the verb, too
    second = Registry(tmp_path / "second")
    assert main(["registry", "--registry", str(second.root), "import", str(tmp_path / "exported")]) == 0, capsys.readouterr()
    entry = second.get("shared-adapter")
    assert (entry.task, entry.method) == (task, method)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        original = load_trained(result.out_dir).model.eval()(input_ids=ids, attention_mask=mask).logits
        imported = load_registered(second, "shared-adapter").model.eval()(input_ids=ids, attention_mask=mask).logits
    assert (original - imported).abs().max() < 1e-5
    assert second.verify().ok


@pytest.mark.parametrize("task", ["classification", "token_classification", "causal_lm", "decoder_classification"])
def test_the_exported_model_card_loads_the_adapter_with_plain_peft(tmp_path, tiny_llama, tiny_bert, docs_file,
                                                                   sentiment_file, task, monkeypatch):
    """README.md's snippet, run as written (no peft_adapt import), computes the logits peft_adapt computes (for a
    decoder's classifier too: the snippet passed add_pooling_layer, which only BERT's family takes)."""
    from conftest import causal_recipe, classification_recipe

    from peft_adapt import parse_recipe, train_domain
    from peft_adapt.runtime.loading import load_trained

    if task == "causal_lm":
        data = causal_recipe(tiny_llama, docs_file, max_steps=2)
    elif task == "decoder_classification":
        data = classification_recipe(tiny_llama, sentiment_file, max_steps=3)
    else:
        data = classification_recipe(tiny_bert, sentiment_file if task == "classification" else _ner_file(tmp_path),
                                     max_steps=3)
        data["task"]["type"] = task
    result = train_domain(parse_recipe(data), next(iter(data["domains"])), tmp_path / "runs")
    registry = Registry(tmp_path / "reg")
    registry.add(result.out_dir, name="carded")
    out = registry.export("carded", tmp_path / "exported")
    config = json.loads((out / "adapter_config.json").read_text())
    on_llama = task in ("causal_lm", "decoder_classification")
    assert config["base_model_name_or_path"] == str(tiny_llama if on_llama else tiny_bert)
    card = (out / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    assert "peft_adapt" not in snippet
    monkeypatch.chdir(out)  # the snippet loads ADAPTER = "." (this folder)
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - our own generated, tested snippet
    ids = scope["batch"]["input_ids"]
    with torch.no_grad():
        ours = load_trained(result.out_dir).model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    theirs = scope["logits"]
    assert (ours - theirs).abs().max() < 1e-5


def test_builtin_bases_are_named_by_their_hub_id_for_plain_tools():
    from peft_adapt.models.builtin_models import portable_name

    assert portable_name("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_name("/models/mine") == "/models/mine"


# ---- read-only registries, a full disk, bad bytes


READ_ONLY_SCRIPT = r"""
import json, os, subprocess, sys, time
import httpx
from peft_adapt.cli.main import main
from peft_adapt import Registry
root, base = sys.argv[1], sys.argv[2]
registry = Registry(root)
print("listed", [e.ref for e in registry.list()], registry.read_only, flush=True)
print("verify", registry.verify().ok, flush=True)
for argv in (["list"], ["show", "t-docs"], ["verify"], ["tag", "t-docs@1", "prod"]):
    print("cli", argv[0], main(["registry", "--registry", root, *argv]), flush=True)
server = subprocess.Popen([sys.executable, "-m", "peft_adapt.cli", "serve", "--base", base, "--quantization", "none",
                           "--registry", root, "--port", sys.argv[3]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
url = f"http://127.0.0.1:{sys.argv[3]}"
for _ in range(300):
    try:
        if httpx.get(url + "/health", timeout=1).status_code == 200:
            break
    except httpx.HTTPError:
        time.sleep(0.2)
reply = httpx.post(url + "/v1/completions", json={"model": "t-docs", "prompt": "def", "max_tokens": 3, "temperature": 0})
print("served", reply.status_code, flush=True)
server.terminate()
print("files", sorted(os.listdir(root)), flush=True)
"""


def test_a_read_only_registry_is_listed_verified_and_served_and_refuses_writes(tmp_path, trained_adapter, tiny_llama):
    from isolation import read_only_bind, run_with_mounts
    from test_server import _free_port

    registry = Registry(tmp_path / "reg")
    registry.add(trained_adapter)
    before = sorted(p.name for p in registry.root.iterdir())
    mount = tmp_path / "ro"
    mount.mkdir()
    done = run_with_mounts(read_only_bind(registry.root, mount), READ_ONLY_SCRIPT, str(mount), str(tiny_llama),
                           str(_free_port()))
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:] + out[-3000:]
    assert "listed ['t-docs@1'] True" in out and "verify True" in out
    assert "cli list 0" in out and "cli show 0" in out and "cli verify 0" in out
    assert "cli tag 2" in out and "is read-only" in done.stdout + done.stderr
    assert "served 200" in out
    assert sorted(p.name for p in registry.root.iterdir()) == before  # nothing written beside it
    assert "Traceback" not in done.stdout + done.stderr


DISK_FULL_SCRIPT = r"""
import os, shutil, sys
from peft_adapt.cli.main import main
from peft_adapt import Registry
disk, adapter = sys.argv[1], sys.argv[2]
registry = Registry(os.path.join(disk, "reg"))
registry.add(adapter)
before = [e.ref for e in registry.list()]
free = shutil.disk_usage(disk).free
with open(os.path.join(disk, "filler"), "wb") as f:  # leave less room than one more adapter needs
    f.write(b"\0" * max(0, free - 16 * 1024))
code = main(["registry", "--registry", registry.root.as_posix(), "add", adapter])
print("add", code, flush=True)
os.remove(os.path.join(disk, "filler"))
print("after", [e.ref for e in registry.list()] == before, registry.verify().ok, flush=True)
print("again", registry.add(adapter).ref, flush=True)
"""


def test_a_full_disk_during_add_is_one_clear_error_and_changes_nothing(tmp_path, trained_adapter):
    from isolation import run_with_mounts

    disk = tmp_path / "disk"
    disk.mkdir()
    done = run_with_mounts([f"mount -t tmpfs -o size=4m tmpfs {disk}"], DISK_FULL_SCRIPT, str(disk), str(trained_adapter))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "add 2" in done.stdout and "no space left on the device" in done.stderr, done.stderr[-2000:]
    assert "after True True" in done.stdout and "again t-docs@2" in done.stdout
    assert "Traceback" not in done.stderr


def test_a_malicious_pickle_is_refused_in_one_line_even_when_pickle_is_allowed(tmp_path, trained_adapter, tiny_llama,
                                                                               capsys):
    import pickle

    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(trained_adapter / "adapter_config.json", folder)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": Payload()}))
    root = tmp_path / "reg"
    code = main(["registry", "--registry", str(root), "import", str(folder), "--base", str(tiny_llama), "--name", "evil",
                 "--allow-pickle"])
    err = capsys.readouterr().err
    assert code == 2 and "refused: not a plain file of tensors" in err and "Traceback" not in err
    assert not (tmp_path / "pwned").exists()


def test_export_to_a_file_is_refused(tmp_path, trained_adapter, capsys):
    root = tmp_path / "reg"
    Registry(root).add(trained_adapter)
    target = tmp_path / "a-file"
    target.write_text("keep me")
    assert main(["registry", "--registry", str(root), "export", "t-docs", "--out", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err and target.read_text() == "keep me"


def _evil_folder(trained_adapter: Path, tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / kind
    shutil.copytree(trained_adapter, folder)
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    if kind == "linked-extra":  # a link among the files that travel
        (folder / "README.md").unlink(missing_ok=True)
        os.symlink(secret, folder / "README.md")
    elif kind == "linked-weights":
        (folder / "adapter_model.safetensors").rename(tmp_path / "real.safetensors")
        os.symlink(tmp_path / "real.safetensors", folder / "adapter_model.safetensors")
    elif kind == "fifo":
        os.mkfifo(folder / "metrics.json.tmp")  # an unknown name: left behind, never opened
        (folder / "metrics.json").unlink()
        os.mkfifo(folder / "metrics.json")
    elif kind == "unknown-link":
        os.symlink(secret, folder / "notes.txt")
    return folder


@pytest.mark.parametrize("kind", ["linked-extra", "linked-weights", "fifo", "unknown-link"])
def test_import_and_add_copy_only_the_adapters_own_plain_files(tmp_path, trained_adapter, tiny_llama, kind):
    folder = _evil_folder(trained_adapter, tmp_path, kind)
    registry = Registry(tmp_path / "reg")
    if kind == "unknown-link":  # not a file of the adapter: left behind, not followed
        entry = registry.add(folder)
        assert not (entry.path / "notes.txt").exists()
        assert "not yours" not in "".join(p.read_text(errors="ignore") for p in entry.path.iterdir())
        return
    for register in (lambda: registry.add(folder), lambda: registry.import_peft(folder, base=str(tiny_llama), name="x")):
        with pytest.raises(UserInputError, match="symbolic link|not a regular file|missing"):
            register()
    assert registry.list() == [] and registry.verify().ok and not registry.verify().orphans


def test_untag_removes_the_tag_and_keeps_the_version(tmp_path, trained_adapter, capsys, backend):
    backend.open().add(trained_adapter, tags=["prod"])
    assert main(["registry", *backend.cli, "untag", "t-docs", "prod"]) == 0
    assert backend.open().get("t-docs@1").tags == []
    assert main(["registry", *backend.cli, "untag", "t-docs", "prod"]) == 2
    assert "has no tag 'prod'" in capsys.readouterr().err
