"""A SQLite catalog this process may not write (a read-only home: a read-only mount, a folder of
another user): opened read-only, so that the commands that only read (``models list``, ``show``,
``verify``) still work, and every write is refused with a message that says why.

SQLite cannot open a WAL database read-only without its ``-shm`` file, and cannot create that
file in a folder it may not write. When no ``-wal`` file is there, every committed change is in the
database file itself (the last writer checkpointed it when it closed), so the file is opened
``immutable``; when a ``-wal`` is there, a writer still has the database open and keeps its ``-shm``,
which a read-only connection then shares (``mode=ro``). An immutable connection does not see what a
writer commits after it opened: right for a command that reads and ends, not for a long-lived
process beside a writer (which should have a writable home).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote, unquote

from sqlalchemy import Engine, event
from sqlalchemy.engine import URL

from ..errors import MoorageError


class CatalogReadOnly(MoorageError):
    status = 503
    code = "catalog_read_only"


def read_only_url(parsed: URL, path: Path) -> URL | None:
    """The URL that opens the SQLite file at `path` read-only, or None when this process may write
    it (and the folder that holds its journal files)."""
    if not path.exists():
        if not os.access(path.parent, os.W_OK):
            raise CatalogReadOnly(f"there is no catalog at {path} and {path.parent} is read-only: nothing to read")
        return None
    if os.access(path, os.W_OK) and os.access(path.parent, os.W_OK):
        return None
    wal = Path(f"{path}-wal")
    query = {"uri": "true", "mode": "ro"} | ({} if wal.exists() else {"immutable": "1"})
    return parsed.set(database="file:" + quote(str(path)), query=query)


def is_read_only(engine: Engine) -> bool:
    return engine.url.query.get("mode") == "ro"


def _path(engine: Engine) -> str:
    return unquote(str(engine.url.database).removeprefix("file:"))


def refuse_writes(engine: Engine) -> None:
    """A write on the read-only catalog fails with `CatalogReadOnly`, not "cannot be reached"."""
    path = _path(engine)

    @event.listens_for(engine, "handle_error")
    def _on_error(context):  # pragma: no cover - trivial
        if "readonly database" in str(context.original_exception):
            raise CatalogReadOnly(
                f"the catalog {path} is read-only (its folder is not writable by this user): this command "
                "changes it; run it where the home folder is writable"
            ) from None


def migration_needed(engine: Engine, current: str | None, head: str | None) -> CatalogReadOnly:
    return CatalogReadOnly(
        f"the catalog {_path(engine)} is read-only and its schema is at revision {current or 'none'}, not {head}: run "
        "any moorage command once with write access to the home folder to upgrade it, then read it here"
    )
