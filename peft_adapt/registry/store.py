"""Where adapters live. Two backends behind one API, chosen by where the registry is:

embedded (the default, a folder): a SQLite index (WAL) and one folder per adapter version.

    <root>/registry.db                 the index: names, versions, tags, a summary of each manifest
    <root>/adapters/<name>/<version>/  the adapter folder (peft files + manifest.json), never edited
    <root>/.staging/                   folders being written

shared (a team's): the same index in PostgreSQL (`postgresql://...`) and the files in object storage
(`s3://bucket/prefix`, content-addressed: object_store.py), fetched into a local cache on use.

A version is written into a staging folder, fsynced, then, inside one write transaction, published (renamed
into place, or its manifest uploaded after its files) and indexed. A crash at any point leaves either the old
state or the new one: what was published by a transaction that never committed is an orphan no reader can
reach (the next writer of that name replaces a folder; `gc` removes blobs). Readers only follow the index, so
they never see half an adapter. Several processes (on several machines, for the shared backend) may write at
once: the index's write lock orders them (registry_index.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from ..errors import UserInputError
from ..faults import crash_point as _crash_point
from ..formats import (
    MANIFEST,
    PICKLE_WEIGHTS,
    SIGNATURE_FILE,
    Manifest,
    adapter_files_to_copy,
    adapter_fit_problems,
    build_manifest,
    check_safetensors,
    convert_pickle_to_safetensors,
    file_checksums,
    folder_kind,
    is_adapter_file,
    publish,
    read_adapter_config,
    read_manifest,
    tensor_shapes,
    verify_checksums,
    weight_files,
    write_manifest,
)
from ..models.model_files import BaseSpec
from .index import PostgresIndex, SQLiteIndex, is_postgres_url
from .refs import Named, check_name, parse_ref, resolve

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
TAG_UPSERT = ("INSERT INTO tags (name, tag, version) VALUES (?, ?, ?) "
              "ON CONFLICT (name, tag) DO UPDATE SET version = excluded.version")


def default_root() -> Path:
    return Path(os.environ.get("PEFT_ADAPT_HOME", Path.home() / ".peft_adapt"))


def default_cache() -> Path:
    """Where a shared registry's versions are fetched to: $PEFT_ADAPT_CACHE, or ~/.cache/peft_adapt."""
    return Path(os.environ.get("PEFT_ADAPT_CACHE", Path.home() / ".cache" / "peft_adapt"))


def registry_location(location=None, store: str | None = None, cache=None) -> tuple[str | Path, str | None, Path | None]:
    """(index, store, cache) from what the user gave: a folder, a postgresql:// URL, or a YAML file naming
    `index`, `store` and `cache`; what is left out comes from $PEFT_ADAPT_REGISTRY / $PEFT_ADAPT_STORE /
    $PEFT_ADAPT_CACHE, then the embedded default."""
    location = location if location not in (None, "") else os.environ.get("PEFT_ADAPT_REGISTRY") or None
    store = store or os.environ.get("PEFT_ADAPT_STORE") or None
    if isinstance(location, (str, Path)) and str(location).endswith((".yaml", ".yml")):
        import yaml

        path = Path(location).expanduser()
        if not path.is_file():
            raise UserInputError(f"registry config {path} does not exist; it names `index:` (a folder or a "
                                 f"postgresql:// URL), `store:` (s3://bucket/prefix) and optionally `cache:`")
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        unknown = set(config) - {"index", "store", "cache"} if isinstance(config, dict) else {"(not a mapping)"}
        if unknown or "index" not in config:
            raise UserInputError(f"registry config {path}: expected the keys index, store, cache; "
                                 f"{'found ' + ', '.join(sorted(map(str, unknown))) if unknown else 'index is missing'}")
        location, store, cache = config["index"], store or config.get("store"), cache or config.get("cache")
    if location is None:
        location = default_root()
    if not is_postgres_url(str(location)):
        location = Path(location).expanduser()
    elif store is None:
        raise UserInputError("a PostgreSQL registry keeps its adapter files in object storage: give --store "
                             "s3://bucket/prefix (or set PEFT_ADAPT_STORE, or name `store:` in a registry config file)")
    return location, store, Path(cache).expanduser() if cache else None


@dataclass
class AdapterEntry:
    name: str
    version: int
    domain: str | None
    method: str | None
    task: str | None
    base_model: str | None
    fingerprint: str | None
    quantization: str | None
    created: str | None
    metrics: dict
    location: str  # a folder, or (shared backend) the sha256 of the version's manifest in the store
    tags: list[str] = field(default_factory=list)
    fetch: Callable[["AdapterEntry"], Path] | None = field(default=None, repr=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @cached_property
    def path(self) -> Path:
        """The version's folder: in a shared registry, fetched into the local cache and checked on first use."""
        return self.fetch(self) if self.fetch else Path(self.location)

    @property
    def manifest(self) -> Manifest:
        return read_manifest(self.path)

    def to_json(self) -> dict:
        return {
            "name": self.name, "version": self.version, "domain": self.domain, "method": self.method,
            "task": self.task, "base": self.base_model, "fingerprint": self.fingerprint,
            "quantization": self.quantization, "created": self.created, "metrics": self.metrics,
            "tags": self.tags, "path": self.location if self.fetch else str(self.path),
        }


@dataclass
class VerifyReport:
    checked: int
    problems: list[str]
    orphans: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def _summary_metrics(metrics: dict) -> dict:
    """What `list` shows: the eval and test scores, without the training bookkeeping."""
    return {split: metrics[split] for split in ("eval", "test") if isinstance(metrics.get(split), dict)}


class Registry:
    def __init__(self, root: str | Path | None = None, store: str | None = None, cache: str | Path | None = None):
        """`root`: a folder (embedded), a postgresql:// URL or a registry config file (see registry_location);
        `store`: where a shared registry keeps its files (s3://bucket/prefix); `cache`: where they are fetched to."""
        location, store, cache = registry_location(root, store, cache)
        self.objects = None
        if is_postgres_url(str(location)):
            self.root = cache or default_cache()  # holds only the staging folders and the cache
            self.index = PostgresIndex(str(location))
            self.read_only = False
        else:
            self.root = Path(location)
            db_path = self.root / "registry.db"
            # a registry on a read-only mount (or without write permission) is read, never written: no folders are
            # made and the journal mode is left as its writer set it
            self.read_only = self.root.is_dir() and not (os.access(self.root, os.W_OK) and
                                                         (not db_path.exists() or os.access(db_path, os.W_OK)))
            if self.read_only and not db_path.is_file():
                raise UserInputError(f"{self.root} is read-only and holds no registry (no registry.db)")
            self.index = SQLiteIndex(db_path, self.read_only)
        self.where = self.index.where + (f" (files in {store})" if store else "")
        if self.read_only:
            return
        with self._writing("open the registry"):
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / ".staging").mkdir(exist_ok=True)
            if store:
                from .objects import ObjectStore

                self.objects = ObjectStore(store, self.root / "cache")
            else:
                (self.root / "adapters").mkdir(exist_ok=True)
            self.index.create()

    @property
    def shared(self) -> bool:
        """True when the files live in object storage (fetched on use), not in folders under `root`."""
        return self.objects is not None

    # ------------------------------------------------------------ plumbing

    def _connect(self):
        return self.index.connect()

    def _require_writable(self, what: str) -> None:
        if self.read_only:
            raise UserInputError(f"cannot {what}: the registry {self.root} is read-only (a read-only mount or no write "
                                 f"permission); reading it works, writes need a writable copy")

    @contextmanager
    def _writing(self, what: str):
        """A full disk (or quota) is the user's to hear about in one line; nothing half-written is left visible."""
        try:
            yield
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise UserInputError(f"cannot {what}: no space left on the device holding {self.root} ({exc.strerror}); "
                                     f"nothing was changed. Free some space and try again") from None
            raise
        except sqlite3.OperationalError as exc:
            if "full" in str(exc) or "disk I/O" in str(exc):
                full = "full" in str(exc) or shutil.disk_usage(self.root).free < 1 << 20
                cause = f"no space left on the device holding {self.root}" if full else "the index could not be written"
                raise UserInputError(f"cannot {what}: {cause} ({exc}); nothing was changed. "
                                     f"{'Free some space and try again' if full else 'Check the disk'}") from None
            raise

    @contextmanager
    def _write(self):
        """One write transaction; the index's lock makes concurrent writers take turns. Every write bumps the change
        counter, which is how other processes (a server) notice that a name may now mean another version."""
        self._require_writable("change the registry")
        with self.index.transaction() as db:
            yield db

    def changes(self) -> int:
        """A counter that moves with every write to the index, by any process: one cheap read to tell whether
        anything a reader cached may have changed."""
        with self._connect() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'changes'").fetchone()
        return row[0] if row else 0

    def _entry(self, db, row) -> AdapterEntry:
        name, version = row[0], row[1]
        tags = [t for (t,) in db.execute("SELECT tag FROM tags WHERE name=? AND version=? ORDER BY tag", (name, version))]
        return AdapterEntry(
            name=name, version=version, domain=row[2], method=row[3], task=row[4], base_model=row[5],
            fingerprint=row[6], quantization=row[7], created=row[8], metrics=json.loads(row[9] or "{}"),
            location=row[10] if self.objects else str(self.root / row[10]), tags=tags,
            fetch=self._fetch if self.objects else None,
        )

    def _fetch(self, entry: AdapterEntry) -> Path:
        return self.objects.fetch(entry.location, entry.ref)

    _COLUMNS = "name, version, domain, method, task, base_model, fingerprint, quantization, created, metrics, path"

    # ------------------------------------------------------------ reading

    def get(self, ref) -> AdapterEntry:
        """`name` (the latest version), `name@3` (a version) or `name@prod` (a tag): a string or a parsed `Named`."""
        ref = parse_ref(ref, folders=False)
        if not isinstance(ref, Named):
            raise UserInputError(f"{ref} is not one registered adapter: give NAME, NAME@VERSION or NAME@TAG")
        name = ref.name
        with self._connect() as db:
            if ref.version is None and ref.tag is None:
                row = db.execute(f"SELECT {self._COLUMNS} FROM adapters WHERE name=? ORDER BY version DESC LIMIT 1", (name,)).fetchone()
            elif ref.version is not None:
                row = db.execute(f"SELECT {self._COLUMNS} FROM adapters WHERE name=? AND version=?", (name, ref.version)).fetchone()
            else:
                row = db.execute(
                    f"SELECT {self._COLUMNS} FROM adapters a WHERE name=? AND version=(SELECT version FROM tags WHERE name=? AND tag=?)",
                    (name, name, ref.tag),
                ).fetchone()
            if row is None:
                raise UserInputError(self._not_found(db, name, ref))
            return self._entry(db, row)

    def locate(self, ref) -> tuple[Path, str]:
        """(folder, source) of a registry ref, or of an adapter folder written as a path. A bare name is always a
        registry name: a folder of that name in the working directory never shadows it."""
        located = resolve(parse_ref(ref), self)
        return located.folder, str(located.folder) if located.version is None else located.source

    def _not_found(self, db, name: str, ref: Named) -> str:
        versions = [v for (v,) in db.execute("SELECT version FROM adapters WHERE name=? ORDER BY version", (name,))]
        if not versions:
            names = [n for (n,) in db.execute("SELECT DISTINCT name FROM adapters ORDER BY name LIMIT 20")]
            return f"no adapter named {name!r} in the registry {self.where}; it has: {', '.join(names) or 'nothing yet'}"
        tags = [t for (t,) in db.execute("SELECT tag FROM tags WHERE name=? ORDER BY tag", (name,))]
        kind, selector = ("version", str(ref.version)) if ref.version is not None else ("tag", ref.tag)
        return (f"adapter {name!r} has no {kind} {selector!r}; versions: {', '.join(map(str, versions))}; "
                f"tags: {', '.join(tags) or 'none'}")

    def list(self, domain: str | None = None, method: str | None = None, base: str | None = None,
             tag: str | None = None, name: str | None = None) -> list[AdapterEntry]:
        query = f"SELECT {self._COLUMNS} FROM adapters WHERE 1=1"
        args: list = []
        for column, value in (("domain", domain), ("method", method), ("name", name)):
            if value is not None:
                query += f" AND {column}=?"
                args.append(value)
        if base is not None:
            query += " AND (base_model=? OR fingerprint=?)"
            args += [base, base]
        if tag is not None:
            query += " AND EXISTS (SELECT 1 FROM tags t WHERE t.name=adapters.name AND t.version=adapters.version AND t.tag=?)"
            args.append(tag)
        with self._connect() as db:
            return [self._entry(db, row) for row in db.execute(query + " ORDER BY name, version", args).fetchall()]

    # ------------------------------------------------------------ writing

    def add(self, folder, name: str | None = None, domain: str | None = None,
            tags: tuple[str, ...] | list[str] = (), allow_pickle: bool = False) -> AdapterEntry:
        """Register a folder written by `peft-adapt train` (or the `TrainResult` that wrote it) as the next
        version of `name`."""
        folder = Path(getattr(folder, "out_dir", folder))
        if not folder.is_dir():
            raise UserInputError(f"{folder} is not a folder; `registry add` takes a folder written by `peft-adapt train`")
        manifest = read_manifest(folder)
        name = check_name(name if name is not None else manifest.name)
        for t in tags:
            self._check_tag(t)
        self._check_files(folder, manifest, allow_pickle)
        self._require_writable(f"add {folder}")
        with self._writing(f"add {folder}"):
            staging = self._stage(folder, allow_pickle)
            return self._commit(staging, manifest, name, domain or manifest.domain, tags)

    def import_peft(self, folder: str | Path, base: str | None = None, name: str | None = None,
                    domain: str | None = None, tags: tuple[str, ...] | list[str] = (),
                    allow_pickle: bool = False) -> AdapterEntry:
        """Register an adapter folder from elsewhere: one that `registry export` wrote (any task and method: its
        manifest travels with it and is checked), or a plain peft folder of a causal LM adapter. Either way every
        adapter matrix must fit a layer of `base` (default: the base its manifest names)."""
        from ..models.fingerprint import base_fingerprint
        from ..models.model_files import resolve_model_path

        folder = Path(folder)
        if not folder.is_dir():
            raise UserInputError(f"{folder} is not a folder; `registry import` takes an adapter folder")
        adapter_files_to_copy(folder)  # links and special files are refused before any file is opened
        manifest = read_manifest(folder) if (folder / MANIFEST).is_file() else None
        if folder_kind(folder) == "trained_weights":
            raise UserInputError(f"{folder} holds a fine-tuned model's weights, not an adapter; only adapters are imported")
        config = read_adapter_config(folder)
        files = weight_files(folder, allow_pickle)
        if manifest is not None:
            self._check_files(folder, manifest, allow_pickle)
            task, base = manifest.task, base or manifest.base_model
        else:
            task = {"CAUSAL_LM": "causal_lm", None: "causal_lm"}.get(config.task_type)
            if not config.is_peft or task is None:
                raise UserInputError(
                    f"{folder}: a {config.task_type or config.method} adapter without {MANIFEST}; only causal LM "
                    f"adapters (task_type CAUSAL_LM) can be imported bare, because other heads differ between peft and "
                    f"this package. Import a folder written by `peft-adapt registry export`, which carries its manifest"
                )
        name = check_name(name or (manifest.name if manifest else ""))
        for t in tags:
            self._check_tag(t)
        if not base:
            raise UserInputError(f"{folder}: name the base model it was trained on (--base MODEL)")
        base_path = resolve_model_path(base)
        fingerprint = base_fingerprint(base_path)
        if manifest is not None:
            _check_same_base(folder, manifest, fingerprint, base)
        base_config = json.loads((base_path / "config.json").read_text(encoding="utf-8"))
        problems = adapter_fit_problems(tensor_shapes(files), fingerprint, base_config, config)
        if problems:
            raise UserInputError(f"{folder} does not fit the base {base!r}: " + "; ".join(problems[:5])
                                 + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        self._require_writable(f"import {folder}")
        with self._writing(f"import {folder}"):
            staging = self._stage(folder, allow_pickle)
            if manifest is not None:  # it now runs on `base`, named as the user named it here
                manifest = manifest.model_copy(update={"base": manifest.base.model_copy(update={"model": base}),
                                                       "base_fingerprint": fingerprint})
            else:
                manifest = build_manifest(staging, base=BaseSpec(model=base, quantization="none"), name=name,
                                          domain=domain or name, method=config.method, task=task,
                                          base_fingerprint=fingerprint, recipe={"task": {"type": task}})
            manifest = manifest.model_copy(update={"imported_from": str(folder.resolve())})
            return self._commit(staging, manifest, name, domain or manifest.domain or name, tags)

    def _check_files(self, folder: Path, manifest: Manifest, allow_pickle: bool) -> None:
        adapter_files_to_copy(folder)  # links and special files are refused before any file is opened
        if folder_kind(folder) == "adapter":
            read_adapter_config(folder)
        weight_files(folder, allow_pickle)
        problems = verify_checksums(folder, manifest)
        if problems:
            raise UserInputError(
                f"{folder}: checksum mismatch, the files changed after the manifest was written: " + "; ".join(problems)
            )
        if manifest.stack_on:  # a stack is registered whole: its domain adapter here, on the same base
            from .stacks import check_stack

            check_stack(manifest, self)

    def _stage(self, folder: Path, allow_pickle: bool) -> Path:
        """Copy the adapter's own files into a private staging folder (pickle converted to safetensors) and fsync it."""
        sources = adapter_files_to_copy(folder)  # refuses links and special files before anything is written
        staging = self.root / ".staging" / f"{os.getpid()}-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            for src in sources:
                if src.name in PICKLE_WEIGHTS:
                    if allow_pickle and not any(f.name != SIGNATURE_FILE for f in folder.glob("*.safetensors")):
                        convert_pickle_to_safetensors(src, staging / "adapter_model.safetensors")
                    continue
                shutil.copyfile(src, staging / src.name, follow_symlinks=False)
            _crash_point("staged")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def _commit(self, staging: Path, manifest: Manifest, name: str, domain: str | None, tags) -> AdapterEntry:
        try:
            if self.objects:  # every file but the manifest is in the store before the transaction begins
                self.objects.put_files(staging)
            with self._write() as db:
                row = db.execute("SELECT last_version FROM names WHERE name=?", (name,)).fetchone()
                version = (row[0] if row else 0) + 1
                manifest = manifest.model_copy(update={"name": name, "domain": domain, "version": version,
                                                       "files": file_checksums(staging)})
                write_manifest(staging, manifest)
                if self.objects:
                    location = self.objects.put_file(staging / MANIFEST)
                else:
                    target = self.root / "adapters" / name / str(version)
                    # a folder already there is an orphan, renamed into place by a writer that died before
                    # committing: `publish` replaces it, and nothing reaches the new folder until the commit
                    publish(staging, target)
                    location = str(target.relative_to(self.root))
                db.execute("INSERT INTO names (name, last_version) VALUES (?, ?) "
                           "ON CONFLICT (name) DO UPDATE SET last_version = excluded.last_version", (name, version))
                db.execute(
                    f"INSERT INTO adapters ({self._COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (name, version, domain, manifest.method, manifest.task, manifest.base_model,
                     manifest.base_fingerprint.get("id"), manifest.quantization, manifest.created,
                     json.dumps(_summary_metrics(manifest.metrics)), location),
                )
                for t in tags:
                    db.execute(TAG_UPSERT, (name, t, version))
                _crash_point("before_commit")
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already unless something failed
        return self.get(f"{name}@{version}")

    def add_files(self, ref: str, files: dict[str, Path]) -> AdapterEntry:
        """A new version of `ref` holding its files plus `files` (name in the folder -> a file to copy), e.g. a
        routing signature: versions never change in place. Its tags stay on the old version."""
        entry = self.get(ref)
        manifest = entry.manifest
        for name in files:
            if not is_adapter_file(name) or "/" in name:
                raise UserInputError(f"{name!r} is not a file an adapter folder carries")
        self._check_files(entry.path, manifest, allow_pickle=False)
        self._require_writable(f"add files to {entry.ref}")
        with self._writing(f"add files to {entry.ref}"):
            staging = self._stage(entry.path, allow_pickle=False)
            try:
                for name, src in files.items():
                    shutil.copyfile(src, staging / name, follow_symlinks=False)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            return self._commit(staging, manifest, entry.name, entry.domain, ())

    def _check_tag(self, tag: str) -> str:
        check_name(tag, "tag")
        if tag.isdigit() or tag == "latest":
            raise UserInputError(f"tag {tag!r} is not allowed: it would read as a version; use a word such as 'prod'")
        return tag

    def tag(self, ref: str, tag: str) -> AdapterEntry:
        """Point `tag` at the adapter version `ref` (moving it if it pointed elsewhere)."""
        self._check_tag(tag)
        entry = self.get(ref)
        with self._write() as db:
            db.execute(TAG_UPSERT, (entry.name, tag, entry.version))
        return self.get(entry.ref)

    def untag(self, name: str, tag: str) -> None:
        with self._write() as db:
            if db.execute("DELETE FROM tags WHERE name=? AND tag=?", (check_name(name), tag)).rowcount == 0:
                raise UserInputError(f"adapter {name!r} has no tag {tag!r}")

    def remove(self, ref: str) -> list[AdapterEntry]:
        """Remove one version (`name@3`, `name@tag`) or, for a bare name, every version of it."""
        parsed = parse_ref(ref, folders=False)
        if not isinstance(parsed, Named):
            raise UserInputError(f"{ref} is not one registered adapter: give NAME, NAME@VERSION or NAME@TAG")
        name = parsed.name
        entries = [self.get(parsed)] if "@" in str(ref) else self.list(name=name)
        if not entries:
            raise UserInputError(self._with_db(lambda db: self._not_found(db, name, parsed)))
        self._refuse_removing_stack_parts(entries)
        with self._write() as db:
            for e in entries:
                db.execute("DELETE FROM adapters WHERE name=? AND version=?", (e.name, e.version))
                db.execute("DELETE FROM tags WHERE name=? AND version=?", (e.name, e.version))
        # after the commit: a crash here leaves only unreachable folders. Blobs stay: another version may share
        # them, and `gc` removes the ones no version uses
        for e in entries if not self.objects else ():
            trash = self.root / ".staging" / f"trash-{uuid.uuid4().hex}"
            try:
                os.rename(e.path, trash)
                shutil.rmtree(trash, ignore_errors=True)
            except FileNotFoundError:
                pass
        return entries

    def _refuse_removing_stack_parts(self, entries: list[AdapterEntry]) -> None:
        """A domain adapter another registered adapter was trained on top of (`stack_on`) stays until that one goes."""
        from ..formats import ADAPTER_WEIGHTS

        def manifest(entry):  # a damaged entry (`verify` reports it) neither blocks nor is blocked
            try:
                return entry.manifest
            except (UserInputError, OSError):
                return None

        going = {(e.name, m.files.get(ADAPTER_WEIGHTS)) for e in entries if (m := manifest(e))}
        leaving = {(e.name, e.version) for e in entries}
        for other in self.list():
            found = manifest(other) if (other.name, other.version) not in leaving else None
            record = found.stack_on if found else None
            if record and (record.get("name"), record.get("weights_sha256")) in going:
                raise UserInputError(f"{other.ref} was trained on top of {record['ref']}: remove {other.ref} first "
                                     f"(nothing was removed)")

    def _with_db(self, fn):
        with self._connect() as db:
            return fn(db)

    # ------------------------------------------------------------ checking and export

    def verify(self) -> VerifyReport:
        """Recompute every checksum; list folders (or blobs) no index entry reaches (left by crashes)."""
        entries = self.list()
        if self.objects:
            return self._verify_objects(entries)
        problems = []
        for e in entries:
            if not e.path.is_dir():
                problems.append(f"{e.ref}: folder {e.path} is missing")
                continue
            try:
                manifest = e.manifest
                for f in e.path.glob("*.safetensors"):
                    check_safetensors(f)
            except UserInputError as exc:
                problems.append(f"{e.ref}: {exc}")
                continue
            if manifest.version != e.version or manifest.name != e.name:
                problems.append(f"{e.ref}: manifest says {manifest.name}@{manifest.version}")
            problems += [f"{e.ref}: {p}" for p in verify_checksums(e.path, manifest)]
            if not manifest.files:
                problems.append(f"{e.ref}: the manifest lists no weight files")
        known = {e.path for e in entries}
        orphans = [str(p) for p in sorted((self.root / "adapters").glob("*/*")) if p not in known]
        staging = self.root / ".staging"
        orphans += [str(p) for p in sorted(staging.iterdir())] if staging.is_dir() else []
        return VerifyReport(len(entries), problems, orphans)

    def _verify_objects(self, entries: list[AdapterEntry]) -> VerifyReport:
        """Every blob of every version re-read from the store and re-hashed; unreferenced blobs are orphans."""
        problems, used = [], set()
        for e in entries:
            found, blobs = self.objects.version_problems(e.location, e.ref)
            problems += found
            used |= blobs
            if not found:
                manifest = self.objects.manifest_of(e.location, e.ref)
                if manifest.version != e.version or manifest.name != e.name:
                    problems.append(f"{e.ref}: manifest says {manifest.name}@{manifest.version}")
        orphans = [path for path, _ in self.objects.unreferenced(used)]
        return VerifyReport(len(entries), problems, orphans)

    def collect_garbage(self, min_age_seconds: float = 3600) -> list[str]:
        """Delete orphan folders (or blobs) older than `min_age_seconds` (younger ones may belong to a live writer)."""
        self._require_writable("collect garbage")
        if self.objects:
            used = set()
            for e in self.list():
                used |= self.objects.blobs_of(e.location, e.ref)  # a version whose manifest is unreadable: gc stops
            old = [path for path, age in self.objects.unreferenced(used) if age >= min_age_seconds]
            for path in old:
                self.objects.remove_blob(path)
            return old
        removed = []
        now = time.time()
        for path in map(Path, self.verify().orphans):
            if now - path.stat().st_mtime >= min_age_seconds:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(str(path))
        return removed

    def export(self, ref: str, out: str | Path) -> Path:
        """Copy an adapter version into `out` as a plain peft folder (with its manifest and model card)."""
        entry = self.get(ref)
        out = Path(out)
        check_export_target(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            for src in adapter_files_to_copy(entry.path) + [entry.path / MANIFEST]:
                shutil.copyfile(src, out / src.name, follow_symlinks=False)
        except OSError as exc:
            raise UserInputError(f"cannot export {entry.ref} to {out}: {exc.strerror or exc}") from None
        return out



def check_export_target(out: Path) -> None:
    """An export writes a new folder: not into a file, not over anything."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"export target {out} is a file; give a new folder's path")
    if out.is_dir() and any(out.iterdir()):
        raise UserInputError(f"export target {out} exists and is not empty; choose a new folder")


def _check_same_base(folder: Path, manifest: Manifest, fingerprint: dict, base: str) -> None:
    """An adapter that says which base it was trained on is imported onto that base only."""
    from ..models.fingerprint import fingerprint_differences

    expected = manifest.base_fingerprint
    if expected.get("id") in (None, fingerprint["id"]):
        return
    diffs = fingerprint_differences(expected, fingerprint)
    raise UserInputError(
        f"{folder} was trained on base {manifest.base_model!r} (fingerprint {expected.get('id')}), not on "
        f"{base!r} (fingerprint {fingerprint['id']}): they differ in " + "; ".join(diffs[:3])
        + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "") + ". Import it with --base naming that model"
    )
