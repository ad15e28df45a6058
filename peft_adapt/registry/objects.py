"""Adapter files in object storage (S3 or any fsspec URL), content-addressed, with a local cache.

    <store>/blobs/<sha256[:2]>/<sha256>   every file of every version, named by its content

A version is its manifest's blob: the index row stores that sha256, and the manifest lists every other file's.
Blobs are written before the index row commits, so a writer killed half-way leaves blobs nothing refers to
(`gc` removes them), never a version with a file missing. A PUT is atomic on S3; elsewhere (a local or mounted
path) a blob is written under a temporary name and moved into place.

Reading fetches a version into `<cache>/<manifest sha256>/` once, checks every file against the manifest, and
checks it again each time it is used: a cache is a copy, and the index's checksums are what is trusted.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..errors import ServiceUnavailable, UserInputError
from ..faults import crash_point
from ..formats import MANIFEST, is_adapter_file, read_manifest, verify_checksums
from ..models.builtin_models import sha256_file
from .index import redact

BLOBS = "blobs"
SHA256 = re.compile(r"[0-9a-f]{64}")


class ObjectStore:
    def __init__(self, url: str, cache: Path):
        try:
            import fsspec
        except ImportError:
            raise UserInputError("a shared store needs fsspec (and s3fs for s3://): pip install 'peft-adapt[team]'"
                                 ) from None
        try:
            # no listings cache: other machines write the store, and a cached listing of `blobs/a1/` made s3fs
            # answer "missing" for a blob committed since (it looks a file's size up in its parent's listing)
            self.fs, prefix = fsspec.core.url_to_fs(url, use_listings_cache=False)
        except (ImportError, ValueError) as exc:
            raise UserInputError(f"store {url!r}: {exc}. Use s3://bucket/prefix (pip install 'peft-adapt[team]') "
                                 f"or a folder path") from None
        self.url = redact(url)  # shown in messages: a key in the URL never is
        self.prefix = prefix.rstrip("/")
        self.atomic_put = "s3" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.cache = Path(cache)

    @contextmanager
    def reachable(self, what: str):
        """A store that cannot be reached (refused, timed out, a server error) is an outage: ServiceUnavailable, one
        line for the operator, nothing about the store for a remote client. A missing blob is not an outage."""
        try:
            yield
        except (UserInputError, FileNotFoundError, PermissionError):
            raise
        except Exception as exc:  # botocore, aiohttp and OSError all say "unreachable" their own way
            raise ServiceUnavailable(f"the registry's object store {self.url} could not {what}: "
                                     f"{type(exc).__name__}: {str(exc)[:300]}. Check that it runs and try again",
                                     public="the adapter registry's files are unavailable; try again shortly"
                                     ) from None

    def blob(self, sha: str) -> str:
        return f"{self.prefix}/{BLOBS}/{sha[:2]}/{sha}"

    # ------------------------------------------------------------ writing

    def put_file(self, path: Path) -> str:
        """Upload one file as a blob and return its sha256. Always uploaded, even when the blob exists: the fresh
        timestamp keeps `gc` (which removes only old unreferenced blobs) off a blob a commit is about to use."""
        sha = sha256_file(path)
        with self.reachable(f"store {path.name}"):
            self._put(path, self.blob(sha))
        return sha

    def _put(self, path: Path, target: str) -> None:
        if self.atomic_put:
            self.fs.put_file(str(path), target)
        else:
            temporary = f"{target}.tmp-{uuid.uuid4().hex}"
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(path), temporary)
            self.fs.mv(temporary, target)

    def put_files(self, folder: Path) -> None:
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name != MANIFEST:
                self.put_file(path)
        crash_point("uploaded")

    # ------------------------------------------------------------ reading

    def fetch(self, manifest_sha: str, ref: str) -> Path:
        """The version's folder in the cache, fetched if absent or if the cached copy no longer matches."""
        if not SHA256.fullmatch(manifest_sha or ""):  # it names a folder here: never a path from the index
            raise UserInputError(f"{ref}: the index names its files {manifest_sha!r}, not a sha256; run `registry verify`")
        folder = self.cache / manifest_sha
        if folder.is_dir():
            if not self._cache_problems(folder, manifest_sha):
                return folder
            self._discard(folder)  # damaged or half-removed: fetched again from the store
        staging = self.cache / ".staging" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            self._download(manifest_sha, staging, ref)
            try:
                os.rename(staging, folder)
            except OSError:  # another process fetched it first: theirs is as good as ours once it checks out
                if self._cache_problems(folder, manifest_sha):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    def _download(self, manifest_sha: str, into: Path, ref: str) -> None:
        self._read_blob(manifest_sha, ref, MANIFEST, into / MANIFEST)
        for name, sha in read_manifest(into).files.items():
            if not is_adapter_file(name) or name == MANIFEST or "/" in name or "\\" in name or name.startswith("."):
                raise UserInputError(f"{ref}: its manifest names a file {name!r} no adapter folder holds")
            self._read_blob(sha, ref, name, into / name)

    def _read_blob(self, sha: str, ref: str, name: str, into: Path) -> None:
        """Download one blob into a file and check it. fsspec streams it to disk (on S3 one GET, large blobs in
        parallel parts), so a blob of any size costs no more memory than a chunk; nothing read is trusted until
        its hash matches its name."""
        if not isinstance(sha, str) or not SHA256.fullmatch(sha):  # a blob name, never a path into the store
            raise UserInputError(f"{ref}: its {name} is recorded as {sha!r}, not a sha256; run `registry verify`")
        try:
            with self.reachable(f"send {name} of {ref}"):
                self.fs.get_file(self.blob(sha), str(into))
        except FileNotFoundError:
            raise UserInputError(f"{ref}: {name} is missing from the store {self.url} (blob {sha[:12]}); "
                                 f"run `registry verify`") from None
        if sha256_file(into) != sha:
            into.unlink()
            raise UserInputError(f"{ref}: checksum mismatch, refusing to load: {name} in the store {self.url} does "
                                 f"not match the index (blob {sha[:12]}); run `registry verify`")

    def _cache_problems(self, folder: Path, manifest_sha: str) -> list[str]:
        manifest = folder / MANIFEST
        if not manifest.is_file() or sha256_file(manifest) != manifest_sha:
            return [f"{manifest}: not the manifest the index names"]
        try:
            return verify_checksums(folder, read_manifest(folder))
        except UserInputError as exc:
            return [str(exc)]

    def _discard(self, folder: Path) -> None:
        trash = self.cache / ".staging" / f"trash-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------ checking

    def version_problems(self, manifest_sha: str, ref: str) -> tuple[list[str], set[str]]:
        """Every blob of a version re-read and re-hashed; (problems, the blobs it uses)."""
        scratch = self.cache / ".staging" / f"verify-{uuid.uuid4().hex}"
        scratch.mkdir(parents=True)
        try:
            try:
                self._read_blob(manifest_sha, ref, MANIFEST, scratch / MANIFEST)
            except ServiceUnavailable:
                raise
            except UserInputError as exc:  # missing or changed: the message names the version already
                return [str(exc)], {manifest_sha}
            try:
                manifest = read_manifest(scratch)
            except UserInputError as exc:
                return [f"{ref}: {exc}"], {manifest_sha}
            problems = []
            for name, sha in manifest.files.items():
                try:
                    self._read_blob(sha, ref, name, scratch / "blob")
                except ServiceUnavailable:
                    raise
                except UserInputError as exc:
                    problems.append(str(exc))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if manifest.version is None:
            problems.append(f"{ref}: its manifest has no version")
        return problems, {manifest_sha, *manifest.files.values()}

    def blobs_of(self, manifest_sha: str, ref: str) -> set[str]:
        """The blobs a version uses, read from its manifest alone (what `gc` must keep)."""
        scratch = self.cache / ".staging" / f"gc-{uuid.uuid4().hex}"
        scratch.mkdir(parents=True)
        try:
            self._read_blob(manifest_sha, ref, MANIFEST, scratch / MANIFEST)
            return {manifest_sha, *read_manifest(scratch).files.values()}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def manifest_of(self, manifest_sha: str, ref: str):
        return read_manifest(self.fetch(manifest_sha, ref))

    def unreferenced(self, used: set[str]) -> list[tuple[str, float]]:
        """(path, age in seconds) of every blob no version uses: what crashed or removed writers left."""
        root = f"{self.prefix}/{BLOBS}"
        with self.reachable("list its blobs"):
            if not self.fs.exists(root):
                return []
            listed = self.fs.find(root, detail=True)
        now = time.time()
        found = []
        for path, info in listed.items():
            if path.rsplit("/", 1)[-1].split(".tmp-")[0] in used and ".tmp-" not in path:
                continue
            modified = info.get("LastModified") or info.get("mtime") or info.get("created")
            stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or now)
            found.append((path, now - stamp))
        return found

    def remove_blob(self, path: str) -> None:
        with self.reachable("remove a blob"):
            self.fs.rm_file(path)
