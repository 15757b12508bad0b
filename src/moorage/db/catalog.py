"""The SQL catalog: engine set-up, schema migrations and write serialisation.

SQLite (the embedded default) takes its write lock at ``BEGIN IMMEDIATE``, so two processes that
move the same alias queue behind each other instead of failing on a stale read. On PostgreSQL a
writer locks the rows it reads (``SELECT ... FOR UPDATE``), as the registry does with a model's row.

The Alembic history (``migrations/``, package data) covers every table of the catalog: registry,
security, jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, NoSuchModuleError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from ..errors import ConfigError, MissingDependency, MoorageError
from . import readonly

log = logging.getLogger("moorage.catalog")

MIGRATIONS = Path(__file__).parent / "migrations"
_PG_MIGRATION_LOCK = 0x6D6F6F72  # 'moor'
_CONNECT_TIMEOUT_S = 5


UNAVAILABLE = "the catalog database cannot be reached; retry shortly"


class CatalogUnavailable(MoorageError):
    """The catalog database cannot be reached (HTTP 503). A client is only ever told `UNAVAILABLE`:
    the message, which may name the database's driver, user, host, port and name, is for the log
    and the command line."""

    status = 503
    code = "catalog_unavailable"
    public = UNAVAILABLE

    def __init__(self, message: str = UNAVAILABLE, *, code: str | None = None) -> None:
        super().__init__(message, code=code)


class Catalog:
    def __init__(self, url: str, lock_timeout_s: float = 30.0) -> None:
        self.url = url
        self.engine = _create_engine(url, lock_timeout_s)
        self.dialect = self.engine.dialect.name
        _ensure_schema(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                yield session
        except DBAPIError as exc:
            # the server is down or dropped the connection; any other database error is a bug or a
            # conflict that its caller handles, and keeps its type
            if not (isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated):
                raise
            log.warning("catalog %s failed: %s", self.safe_url, exc.orig)
            raise CatalogUnavailable() from None
        except PoolTimeout as exc:  # every pooled connection is busy (each waits on a slow catalog)
            log.warning("catalog %s: %s", self.safe_url, exc)
            raise CatalogUnavailable() from None

    @property
    def safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()


def _create_engine(url: str, lock_timeout_s: float) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"bad catalog URL {url!r}: use a SQLAlchemy URL such as sqlite:///path/catalog.db "
            "or postgresql://user:pass@host/db"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, lock_timeout_s)
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("", "psycopg"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise MissingDependency("a PostgreSQL catalog needs psycopg: pip install 'moorage[postgres]'") from None
        parsed = parsed.set(drivername="postgresql+psycopg")
    # an unreachable host (dropped packets, not a refusal) fails in seconds, not the system's minutes
    connect_args: dict[str, int] = {}
    if parsed.get_driver_name() in ("psycopg", "psycopg2") and "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = _CONNECT_TIMEOUT_S
    try:
        return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    except (NoSuchModuleError, ImportError) as exc:
        safe = parsed.render_as_string(hide_password=True)
        raise MissingDependency(f"no driver for catalog URL {safe!r}: {exc}") from None


def _sqlite_engine(parsed, lock_timeout_s: float) -> Engine:
    read_only = None
    if parsed.database and parsed.database != ":memory:":
        path = Path(parsed.database).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        read_only = readonly.read_only_url(parsed, path)  # a read-only home still lists and shows
    engine = create_engine(read_only or parsed, connect_args={"timeout": lock_timeout_s}, poolclass=NullPool)
    if read_only is not None:
        readonly.refuse_writes(engine)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # pragma: no cover - trivial
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(lock_timeout_s * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # pragma: no cover - trivial
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _alembic_config():
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def _ensure_schema(engine: Engine) -> None:
    """Upgrade the catalog to the newest schema; a no-op (one query) when it is already there."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = _alembic_config()
    head = ScriptDirectory.from_config(cfg).get_current_head()
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            if current == head:
                return
        if readonly.is_read_only(engine):
            raise readonly.migration_needed(engine, current, head)
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except OperationalError as exc:
        safe = engine.url.render_as_string(hide_password=True)
        # the command line shows the message; a network client is only told CatalogUnavailable.public
        raise CatalogUnavailable(f"cannot open catalog {safe}: {exc.orig}") from None
