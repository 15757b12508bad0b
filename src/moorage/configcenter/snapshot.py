"""The last applied config of a process, kept on its disk so that it can start without the center.

One file per group (``config.snapshot_dir`` or HOME/config-snapshots), written atomically (a
temporary file in the same folder, flushed to disk, then renamed over the old one: a crash leaves
the old snapshot or the new one, never half of one) and holding the sha256 of its content: a file
that does not match is refused, never used."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..config import Settings

if TYPE_CHECKING:
    from .releases import Effective

FORMAT = 1


class SnapshotCorrupted(Exception):
    """A snapshot file that cannot be read or whose checksum does not match its content."""


def snapshot_path(settings: Settings, group: str) -> Path:
    folder = settings.config.snapshot_dir or settings.home / "config-snapshots"
    return Path(folder).expanduser() / f"{quote(group, safe='')}.json"


def effective_json(effective: Effective) -> dict[str, Any]:
    """An Effective as JSON data: what ``/v1/config/watch`` answers and a snapshot holds."""
    return {
        "revision": effective.revision,
        "values": effective.values,
        "releases": list(effective.releases),
        "checksum": effective.checksum,
        "request_gray": list(effective.request_gray),
    }


def effective_from_json(data: Any) -> Effective:
    """The inverse of `effective_json`; ValueError when `data` is not one."""
    from .releases import Effective

    try:
        values, releases, request_gray = data["values"], data["releases"], data.get("request_gray", [])
        if not isinstance(values, dict) or not isinstance(releases, list) or not isinstance(request_gray, list):
            raise TypeError("values must be an object, releases and request_gray lists")
        if not all(isinstance(arm, dict) for arm in request_gray):
            raise TypeError("each request_gray entry must be an object")
        return Effective(
            revision=int(data["revision"]),
            values=values,
            releases=tuple(int(n) for n in releases),
            checksum=str(data["checksum"]),
            request_gray=tuple(request_gray),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a config: {type(exc).__name__}: {exc}") from None


def _digest(content: Any) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Snapshot:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, effective: Effective) -> None:
        content = {"format": FORMAT, "effective": effective_json(effective)}
        data = json.dumps({**content, "sha256": _digest(content)}, sort_keys=True, ensure_ascii=False).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(staging, self.path)  # several processes of one group may write: each rename is whole
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
        _fsync_folder(self.path.parent)

    def load(self) -> Effective | None:
        """The snapshot, None when there is none; SnapshotCorrupted when it does not verify."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SnapshotCorrupted(f"cannot read it: {exc.strerror or exc}") from None
        try:
            data = json.loads(raw)
            stored = data.pop("sha256")
        except (ValueError, AttributeError, KeyError, TypeError):
            raise SnapshotCorrupted("it is not a config snapshot (unreadable JSON or no checksum)") from None
        if not isinstance(stored, str) or _digest(data) != stored:
            raise SnapshotCorrupted("its sha256 does not match its content")
        if data.get("format") != FORMAT:
            raise SnapshotCorrupted(f"format {data.get('format')!r} is not {FORMAT}")
        try:
            return effective_from_json(data.get("effective"))
        except ValueError as exc:
            raise SnapshotCorrupted(str(exc)) from None


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
