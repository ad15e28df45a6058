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
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserInputError
from ..faults import crash_point as _crash_point
from ..formats import (
    ADAPTER_WEIGHTS,
    MANIFEST,
    PICKLE_WEIGHTS,
    SIGNATURE_FILE,
    Manifest,
    adapter_files_to_copy,
    check_signature_file,
    convert_pickle_to_safetensors,
    file_checksums,
    folder_kind,
    is_adapter_file,
    publish,
    read_adapter_config,
    read_manifest,
    verify_checksums,
    weight_files,
    write_manifest,
)
from .checks import collect_garbage, verify
from .entries import AdapterEntry, VerifyReport
from .index import PostgresIndex, SQLiteIndex, is_postgres_url, redact
from .objects import ObjectStore
from .refs import Named, check_name, parse_ref, resolve
from .stacks import check_stack
from .transfer import export_folder, import_folder

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
        self.where = self.index.where + (f" (files in {redact(store)})" if store else "")
        if self.read_only:
            return
        with self._writing("open the registry"):
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / ".staging").mkdir(exist_ok=True)
            if store:
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
                raise UserInputError(*self._not_found(db, name, ref))
            return self._entry(db, row)

    def locate(self, ref) -> tuple[Path, str]:
        """(folder, source) of a registry ref, or of an adapter folder written as a path. A bare name is always a
        registry name: a folder of that name in the working directory never shadows it."""
        located = resolve(parse_ref(ref), self)
        return located.folder, str(located.folder) if located.version is None else located.source

    def _not_found(self, db, name: str, ref: Named) -> tuple[str, str]:
        """What the operator reads (the registry's location, what it holds), and what a remote client may read."""
        versions = [v for (v,) in db.execute("SELECT version FROM adapters WHERE name=? ORDER BY version", (name,))]
        if not versions:
            names = [n for (n,) in db.execute("SELECT DISTINCT name FROM adapters ORDER BY name LIMIT 20")]
            return (f"no adapter named {name!r} in the registry {self.where}; it has: {', '.join(names) or 'nothing yet'}",
                    f"no adapter named {name!r}")
        tags = [t for (t,) in db.execute("SELECT tag FROM tags WHERE name=? ORDER BY tag", (name,))]
        kind, selector = ("version", str(ref.version)) if ref.version is not None else ("tag", ref.tag)
        return (f"adapter {name!r} has no {kind} {selector!r}; versions: {', '.join(map(str, versions))}; "
                f"tags: {', '.join(tags) or 'none'}", f"adapter {name!r} has no {kind} {selector!r}")

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
        """Register an adapter folder from elsewhere (transfer.py): one `registry export` wrote, or a plain peft
        folder of a causal LM adapter; every adapter matrix must fit a layer of `base`."""
        return import_folder(self, folder, base, name, domain, tags, allow_pickle)

    def _check_files(self, folder: Path, manifest: Manifest, allow_pickle: bool) -> None:
        adapter_files_to_copy(folder)  # links and special files are refused before any file is opened
        if folder_kind(folder) == "adapter":
            read_adapter_config(folder)
        weight_files(folder, allow_pickle)
        if (folder / SIGNATURE_FILE).is_file():
            check_signature_file(folder / SIGNATURE_FILE)
        problems = verify_checksums(folder, manifest)
        if problems:
            raise UserInputError(
                f"{folder}: checksum mismatch, the files changed after the manifest was written: " + "; ".join(problems)
            )
        if manifest.stack_on:  # a stack is registered whole: its domain adapter here, on the same base

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
            if name == SIGNATURE_FILE:
                check_signature_file(Path(files[name]))
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
            raise UserInputError(*self._with_db(lambda db: self._not_found(db, name, parsed)))
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

    # ------------------------------------------------------------ checking and export (checks.py, transfer.py)

    def verify(self) -> VerifyReport:
        """Recompute every checksum; list folders (or blobs) no index entry reaches (left by crashes)."""
        return verify(self)

    def collect_garbage(self, min_age_seconds: float = 3600) -> list[str]:
        """Delete orphan folders (or blobs) older than `min_age_seconds` (younger ones may belong to a live writer)."""
        return collect_garbage(self, min_age_seconds)

    def export(self, ref: str, out: str | Path) -> Path:
        """Copy an adapter version into `out` as a plain peft folder (with its manifest and model card)."""
        return export_folder(self, ref, out)

