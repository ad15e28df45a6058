"""The shared registry's own behaviour (PostgreSQL index + S3 files, real servers): what several machines see, the
local cache, garbage after a crash, and how it is named. The guarantees both backends share are tested in
test_registry.py on both."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys

import pytest
import yaml

from peft_adapt import Registry, UserInputError
from peft_adapt.cli.main import main


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_two_machines_see_one_registry_and_each_checks_its_cache(tmp_path, trained_adapter, team, monkeypatch):
    first = team.open(cache=str(tmp_path / "machine-a"))
    second = team.open(cache=str(tmp_path / "machine-b"))
    # blobs larger than a block download in parallel ranged parts: the assembled copy must still be exact
    monkeypatch.setattr(second.objects.fs, "default_block_size", 4096)
    assert (trained_adapter / "adapter_model.safetensors").stat().st_size > 3 * 4096
    added = first.add(trained_adapter, tags=["prod"])
    seen = second.get("t-docs@prod")
    assert seen.version == added.version == 1
    assert seen.path != added.path and seen.path.is_relative_to(tmp_path / "machine-b")
    assert _digest(seen.path) == _digest(added.path)
    original = _digest(trained_adapter)
    assert all(original[n] == _digest(seen.path)[n] for n in ("adapter_config.json", "adapter_model.safetensors"))
    # a cached copy damaged on one machine is noticed before use and fetched again, whole
    weights = seen.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    again = second.get("t-docs@prod").path
    assert _digest(again) == _digest(added.path)
    second.tag("t-docs@1", "candidate")
    assert first.get("t-docs@1").tags == ["candidate", "prod"]
    assert first.changes() == second.changes()


def test_a_crash_after_upload_leaves_blobs_for_gc_and_nothing_visible(tmp_path, trained_adapter, team):
    registry = team.open()
    registry.add(trained_adapter, name="kept")
    before = _digest(registry.get("kept").path)
    code = "import sys; from peft_adapt import Registry; Registry().add(sys.argv[1], name='lost')"
    changed = trained_adapter.parent / "changed"
    changed.mkdir()
    for p in trained_adapter.iterdir():  # a different README: one blob only this version would use
        (changed / p.name).write_bytes(p.read_bytes())
    (changed / "README.md").write_text("a model card no other version has\n")
    _rehash(changed)
    proc = subprocess.run([sys.executable, "-c", code, str(changed)], env=team.env | {"PEFT_ADAPT_CRASH_AT": "uploaded"})
    assert proc.returncode == -signal.SIGKILL
    report = registry.verify()
    assert report.ok and [e.ref for e in registry.list()] == ["kept@1"]
    assert len(report.orphans) == 1  # the README blob: every other file is shared with kept@1
    assert registry.collect_garbage(min_age_seconds=3600) == []  # too young: it may be a live writer's
    assert registry.collect_garbage(min_age_seconds=0) == report.orphans
    assert registry.verify().orphans == [] and registry.verify().ok
    assert _digest(team.open(cache=str(tmp_path / "fresh")).get("kept").path) == before


def _rehash(folder) -> None:
    from peft_adapt.formats import file_checksums, read_manifest, write_manifest

    manifest = read_manifest(folder)
    write_manifest(folder, manifest.model_copy(update={"files": file_checksums(folder)}))


def test_remove_keeps_blobs_other_versions_share(tmp_path, trained_adapter, team):
    registry = team.open()
    first = registry.add(trained_adapter)
    registry.add(trained_adapter)
    registry.remove("t-docs@1")
    # only the removed version's manifest is garbage: its weights and configs are the same blobs t-docs@2 uses
    assert registry.collect_garbage(min_age_seconds=0) == [registry.objects.blob(first.location)]
    fresh = team.open(cache=str(tmp_path / "fresh"))
    assert fresh.verify().ok and not fresh.verify().orphans
    assert _digest(fresh.get("t-docs@2").path)["adapter_model.safetensors"] == \
        _digest(trained_adapter)["adapter_model.safetensors"]


def test_a_config_file_names_the_shared_registry_and_bad_locations_are_explained(tmp_path, trained_adapter, team,
                                                                                   capsys):
    config = tmp_path / "team.yaml"
    config.write_text(yaml.safe_dump({"index": team.location, "store": team.store, "cache": str(tmp_path / "c")}))
    assert main(["registry", "--registry", str(config), "add", str(trained_adapter)]) == 0
    assert Registry(str(config)).get("t-docs").version == 1
    capsys.readouterr()
    assert main(["registry", "--registry", str(config), "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["name"], e["version"]) for e in listed] == [("t-docs", 1)]
    assert len(listed[0]["path"]) == 64  # where it is: its manifest's blob, not a folder of this machine
    with pytest.raises(UserInputError, match="keeps its adapter files in object storage"):
        Registry(team.location, store=None)
    with pytest.raises(UserInputError, match=r"cannot reach the registry database postgresql://u:\*\*\*@127.0.0.1:9/x"):
        Registry("postgresql://u:secret@127.0.0.1:9/x", store=team.store)
    bad = tmp_path / "bad.yaml"
    bad.write_text("index: x\nbucket: y\n")
    with pytest.raises(UserInputError, match="found bucket"):
        Registry(str(bad))


def test_an_index_row_never_names_a_path_outside_the_cache(tmp_path, trained_adapter, team):
    import psycopg

    registry = team.open()
    registry.add(trained_adapter)
    with psycopg.connect(team.location, autocommit=True) as conn:  # a damaged (or hostile) index row
        conn.execute("UPDATE adapters SET path = '../../outside' WHERE name = 't-docs'")
    with pytest.raises(UserInputError, match="not a sha256"):
        registry.get("t-docs").path
    assert not (tmp_path / "outside").exists()
