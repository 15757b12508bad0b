"""Envelope encryption of artifacts: AES-256-GCM, a data key per version, wrapped by a master key.

File format (chunked, so a large file never sits twice in memory while it is written)::

    b"MOORENC1" | prefix (7 random bytes) | chunk_0 | ... | chunk_n

Each chunk is up to `CHUNK` plaintext bytes sealed with AES-GCM (16-byte tag) under the nonce
``prefix | counter (4 bytes) | last (1 byte)`` and the file's relative path as associated data, so
chunks cannot be reordered, truncated, or moved to another file without failing authentication.
The data key is wrapped with AES-GCM under the master key, with ``NAME:VERSION`` as associated
data: a wrapped key only opens its own version.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..errors import EncryptionError

ALGORITHM = "AES-256-GCM"
MAGIC = b"MOORENC1"
CHUNK = 1 << 20
TAG = 16
_PREFIX = 7


def _aesgcm(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


@dataclass(frozen=True)
class MasterKey:
    key: bytes

    @property
    def id(self) -> str:
        """A public fingerprint that names the key in errors and in the catalog (not the key)."""
        return hashlib.sha256(b"moorage-master-key:" + self.key).hexdigest()[:16]

    def __repr__(self) -> str:  # never print the key
        return f"MasterKey(id={self.id})"

    @classmethod
    def from_text(cls, text: str, where: str) -> MasterKey:
        try:
            key = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise EncryptionError(f"the master key in {where} is not base64", code="invalid_master_key") from None
        if len(key) != 32:
            raise EncryptionError(
                f"the master key in {where} has {len(key)} bytes; AES-256 needs 32 "
                "(make one with `moorage models new-master-key FILE`)",
                code="invalid_master_key",
            )
        return cls(key)

    @classmethod
    def from_file(cls, path: Path) -> MasterKey:
        try:
            text = Path(path).expanduser().read_text()
        except OSError as exc:
            raise EncryptionError(
                f"cannot read master key file {path}: {exc.strerror or exc}", code="missing_master_key"
            ) from None
        return cls.from_text(text, f"file {path}")


def master_key_from_settings(security) -> MasterKey | None:
    """The configured master key (``security.master_key`` or ``security.master_key_file``), or None."""
    if security.master_key is not None:
        return MasterKey.from_text(security.master_key.get_secret_value(), "security.master_key")
    if security.master_key_file is not None:
        return MasterKey.from_file(security.master_key_file)
    return None


def generate_master_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def new_data_key() -> bytes:
    return secrets.token_bytes(32)


def wrap_key(master: MasterKey, data_key: bytes, owner: str) -> str:
    nonce = secrets.token_bytes(12)
    return base64.b64encode(nonce + _aesgcm(master.key).encrypt(nonce, data_key, owner.encode())).decode()


def unwrap_key(master: MasterKey, wrapped: str, owner: str) -> bytes:
    from cryptography.exceptions import InvalidTag

    raw = base64.b64decode(wrapped)
    try:
        return _aesgcm(master.key).decrypt(raw[:12], raw[12:], owner.encode())
    except InvalidTag:
        raise EncryptionError(
            f"the data key of {owner} does not open with master key {master.id}: wrong key, or the wrapped key "
            "was altered",
            code="wrong_master_key",
        ) from None


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class EncryptingReader:
    """A read-only file object over `src` that yields the encrypted file format."""

    def __init__(self, src, data_key: bytes, rel_path: str) -> None:
        self.src = src
        self.aead = _aesgcm(data_key)
        self.aad = rel_path.encode()
        self.prefix = secrets.token_bytes(_PREFIX)
        self.counter = 0
        self.buffer = MAGIC + self.prefix
        self.pending = src.read(CHUNK)
        self.done = False

    def _next_chunk(self) -> None:
        following = self.src.read(CHUNK) if len(self.pending) == CHUNK else b""
        last = not following
        self.buffer += self.aead.encrypt(_nonce(self.prefix, self.counter, last), self.pending, self.aad)
        self.counter += 1
        self.pending = following
        self.done = last

    def read(self, size: int = -1) -> bytes:
        while not self.done and (size < 0 or len(self.buffer) < size):
            self._next_chunk()
        if size < 0:
            size = len(self.buffer)
        out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.src.close()


def decrypt_file(f, data_key: bytes, rel_path: str, owner: str) -> bytes:
    """The plaintext of one encrypted file (in memory), or `EncryptionError` if anything was altered."""
    from cryptography.exceptions import InvalidTag

    header = f.read(len(MAGIC) + _PREFIX)
    if header[: len(MAGIC)] != MAGIC:
        raise EncryptionError(f"file {rel_path} of {owner} is not an encrypted artifact", code="tampered_artifact")
    prefix, aead, aad = header[len(MAGIC) :], _aesgcm(data_key), rel_path.encode()
    out, counter = bytearray(), 0
    chunk = f.read(CHUNK + TAG)
    while True:
        following = f.read(CHUNK + TAG) if len(chunk) == CHUNK + TAG else b""
        try:
            out += aead.decrypt(_nonce(prefix, counter, not following), chunk, aad)
        except InvalidTag:
            raise EncryptionError(
                f"file {rel_path} of {owner} failed authentication (tampered, truncated or wrong key); "
                "nothing of it was used",
                code="tampered_artifact",
            ) from None
        if not following:
            return bytes(out)
        chunk, counter = following, counter + 1


class MemoryFolder:
    """A folder whose files live only in memory: each entry is a symlink to an anonymous memory
    file (Linux memfd), so loaders that open paths (transformers, safetensors) read plaintext that
    never touches a disk. The folder holds links only; it is removed on exit."""

    def __init__(self, files: dict[str, bytes]) -> None:
        if not hasattr(os, "memfd_create"):
            raise EncryptionError("encrypted artifacts load only where memfd_create exists (Linux)")
        import tempfile

        self.path = Path(tempfile.mkdtemp(prefix="moorage-mem-"))
        self.fds: list[int] = []
        try:
            for rel, data in files.items():
                fd = os.memfd_create(f"moorage:{Path(rel).name}", os.MFD_CLOEXEC)
                self.fds.append(fd)
                with os.fdopen(os.dup(fd), "wb") as w:
                    w.write(data)
                link = self.path / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(f"/proc/{os.getpid()}/fd/{fd}", link)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)
        for fd in self.fds:
            os.close(fd)  # mappings made while loading stay valid; the memory goes with them
        self.fds = []

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.close()
