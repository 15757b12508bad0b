"""Artifact store over fsspec: a local folder by default, any fsspec URL otherwise.

Layout: ``<root>/<model>/<version>/`` holds the model files and the manifest ``moorage.json``.
Files are hashed while they are copied, so registering reads each byte once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import IntegrityError, MoorageError
from .manifest import CHUNK, MANIFEST_NAME, FileEntry, Manifest


class Progress(Protocol):
    """What long operations report to: the CLI draws a rich progress bar from it."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, amount: int) -> None: ...


class NoProgress:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass


class StoreError(MoorageError):
    status = 503
    code = "store_unavailable"
    public = "the artifact store is not available (the server log says why)"  # the message names its URL


class ArtifactStore:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise StoreError(f"cannot open artifact store {url!r}: {exc}") from None
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def version_path(self, name: str, version: int) -> str:
        return f"{self.root}/{name}/{version}"

    def write_version(
        self,
        files: Iterable[tuple[str, Callable[[], Any], int]],
        name: str,
        version: int,
        progress: Progress,
    ) -> list[FileEntry]:
        """Copy each (relative path, opener, size) into the version folder, hashing as it goes. The
        entries describe the bytes stored (the ciphertext when the opener encrypts)."""
        entries = []
        base = self.version_path(name, version)
        for rel, opener, _size in files:
            target = f"{base}/{rel}"
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            digest, written = hashlib.sha256(), 0
            with opener() as src, self.fs.open(target, "wb") as dst:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    written += len(chunk)
                    progress.advance(len(chunk))
            entries.append(FileEntry(path=rel, sha256=digest.hexdigest(), size=written))
        return entries

    def write_manifest(self, manifest: Manifest) -> bytes:
        data = manifest.to_bytes()
        with self.fs.open(f"{self.version_path(manifest.name, manifest.version)}/{MANIFEST_NAME}", "wb") as f:
            f.write(data)
        return data

    def open(self, name: str, version: int, rel: str):
        return self.fs.open(f"{self.version_path(name, version)}/{rel}", "rb")

    def read_manifest_bytes(self, name: str, version: int) -> bytes:
        with self.open(name, version, MANIFEST_NAME) as f:
            return f.read()

    def list_files(self, name: str, version: int) -> list[str]:
        base = self.version_path(name, version)
        if not self.fs.exists(base):
            return []
        found = self.fs.find(base)
        return sorted(_strip(p, base) for p in found)

    def remove(self, name: str, version: int) -> None:
        """Remove a version's files, and the model's folder once it is empty (object stores have none)."""
        path = self.version_path(name, version)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        if self.is_local:
            try:
                os.rmdir(f"{self.root}/{name}")
            except OSError:  # another version is there (or being written), or it is gone already
                pass

    def verify(self, manifest: Manifest, progress: Progress | None = None) -> list[str]:
        """Recompute every checksum; return one problem line per bad, missing or extra file."""
        progress = progress or NoProgress()
        progress.start(f"verify {manifest.name}:{manifest.version}", manifest.size_bytes)
        problems = []
        present = set(self.list_files(manifest.name, manifest.version))
        for entry in manifest.files:
            if entry.path not in present:
                problems.append(f"{entry.path}: missing")
                continue
            with self.open(manifest.name, manifest.version, entry.path) as f:
                digest, size = hash_stream(f, progress)
            if size != entry.size or digest != entry.sha256:
                problems.append(
                    f"{entry.path}: checksum mismatch (expected sha256 {entry.sha256[:12]}..., "
                    f"found {digest[:12]}..., {size} bytes)"
                )
        listed = {e.path for e in manifest.files} | {MANIFEST_NAME}
        problems += [f"{p}: not in the manifest" for p in sorted(present - listed)]
        return problems

    def local_copy(self, manifest: Manifest, cache_dir: Path, progress: Progress) -> Path:
        """A local folder holding the version: the store itself, or a verified cached copy."""
        if self.is_local:
            return Path(self.version_path(manifest.name, manifest.version))
        key = hashlib.sha256(self.url.encode()).hexdigest()[:12]
        target = cache_dir / key / manifest.name / str(manifest.version)
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
        try:
            progress.start(f"fetch {manifest.name}:{manifest.version}", manifest.size_bytes)
            for entry in manifest.files:
                dest = staging / entry.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                with self.open(manifest.name, manifest.version, entry.path) as src, open(dest, "wb") as dst:
                    while chunk := src.read(CHUNK):
                        dst.write(chunk)
                        progress.advance(len(chunk))
            (staging / MANIFEST_NAME).write_bytes(manifest.to_bytes())
            try:
                os.rename(staging, target)
            except OSError:  # another process fetched it first
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target


def hash_stream(f, progress: Progress | None = None) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while chunk := f.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if progress:
            progress.advance(len(chunk))
    return digest.hexdigest(), size


def verify_local(folder: Path, manifest: Manifest) -> None:
    """Refuse a local copy whose files differ from the manifest, naming the first bad file."""
    for entry in manifest.files:
        path = folder / entry.path
        try:
            with open(path, "rb") as f:
                digest, size = hash_stream(f)
        except FileNotFoundError:
            raise IntegrityError(
                f"{manifest.name}:{manifest.version} is incomplete: file {entry.path} is missing"
            ) from None
        if digest != entry.sha256 or size != entry.size:
            raise IntegrityError(
                f"refusing to load {manifest.name}:{manifest.version}: file {entry.path} does not "
                "match its checksum (tampered or corrupted); run `moorage models verify` for a report"
            )


def _strip(path: str, base: str) -> str:
    path = path.rstrip("/")
    base_stripped = base.lstrip("/") if not path.startswith("/") else base
    return path[len(base_stripped) :].lstrip("/")
