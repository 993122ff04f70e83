"""Engine and session setup for sealserve's SQL database (SQLite by default, PostgreSQL for a cluster).

The accounts tables live in :mod:`lib.accounts.tables`; this module only knows how to reach a database:
which URL to use, how to configure each dialect's connections, and how to render a URL for a log
line without its password.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, create_engine, event
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from lib.errors import ConfigurationError, ServiceUnavailableError

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path(".sealserve")
SQLITE_FILE = "sealserve.db"
DATABASE_URL_ENV = "DATABASE_URL"

# Long enough to ride out a writer committing a usage batch; short enough that a wedged database
# surfaces as an error instead of a hung request.
SQLITE_BUSY_TIMEOUT_MS = 5000
POSTGRES_CONNECT_TIMEOUT_S = 5


def resolve_database_url(*candidates: str | None, state_dir: Path = DEFAULT_STATE_DIR) -> str:
    """The accounts database: the first URL given, else the SQLite file in ``state_dir``.

    The one resolver for the app (args, then ``DATABASE_URL``) and the CLI (``--database-url``,
    then ``DATABASE_URL``); each passes its candidates in order of precedence.
    """
    for url in candidates:
        if url:
            return url
    return f"sqlite:///{(state_dir / SQLITE_FILE).as_posix()}"


def redact_url(url: str) -> str:
    """The URL as it may appear in a log line or an error message: password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


@contextmanager
def database_errors(database: str, what: str) -> Iterator[None]:
    """Connection-level failures become a 503 naming ``database``; real bugs propagate unchanged."""
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        log.warning("%s database unavailable while trying to %s: %s", database, what, type(exc).__name__)
        raise ServiceUnavailableError(f"the {database} database is unavailable") from None


def create_database_engine(url: str) -> Engine:
    """An engine configured for the URL's dialect.

    SQLite gets WAL mode (readers do not block the usage writer) and a busy timeout (two processes
    writing at once wait instead of failing with "database is locked"). PostgreSQL gets a connect
    timeout and pre-ping, so a restarted server costs one reconnect rather than a failed request.
    Both hide statement parameters from error messages: they may be password hashes, sealed keys
    or key hashes, and error messages end up in tracebacks and logs.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        # The URL itself may hold a password, so it is not echoed back.
        raise ConfigurationError("the database URL cannot be parsed") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(url, parsed.database)
    if backend == "postgresql":
        return create_engine(
            url,
            hide_parameters=True,
            pool_pre_ping=True,
            connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S},
        )
    raise ConfigurationError(f"unsupported database backend {backend!r}; use sqlite or postgresql")


def _sqlite_engine(url: str, database: str | None) -> Engine:
    in_memory = not database or database == ":memory:"
    kwargs: dict[str, Any] = {}
    if in_memory:
        # An in-memory database exists per connection: share one connection between threads, or
        # each thread would see an empty database.
        kwargs = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    else:
        # The file holds key hashes and usage: not secrets, but nobody else's business either.
        _private_file(Path(database or "").expanduser())
    engine = create_engine(url, hide_parameters=True, **kwargs)

    @event.listens_for(engine, "connect")
    def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                # Safe under WAL (a power cut may lose the last commits, never corrupt the file),
                # and it keeps usage batches from fsyncing twice.
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    return engine


def _private_file(path: Path) -> None:
    """Create the SQLite file 0600 (its directory 0700) before SQLite does with the umask's 0644;
    tighten one of ours that others can read. SQLite gives its -wal and -shm files the same mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077 and st.st_uid == os.getuid():
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o700)
    finally:
        os.close(fd)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, whatever the database keeps.

    SQLite has no timezone-aware type and silently drops ``tzinfo``; storing naive UTC there and
    re-attaching UTC on the way out makes both dialects compare and group timestamps the same way.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: sealserve stores timezone-aware UTC timestamps only")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class UtcBase(DeclarativeBase):
    """The declarative base of sealserve's tables: every ``datetime`` column is :class:`UTCDateTime`.

    Each store derives an abstract base with its own ``MetaData`` (the accounts tables and the
    resource API's tables are created, and may live, apart).
    """

    type_annotation_map = {datetime: UTCDateTime()}

