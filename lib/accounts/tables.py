"""The ORM tables behind :class:`lib.accounts.store.AccountStore`: users, api_keys, usage_records.

Rows never leave :mod:`lib.accounts.store`; callers get frozen records instead (picklable across Ray, and
no lazy loads from a closed session).

Schema changes: a new table is created by ``create_all``; a column added to an existing table is
listed in :data:`ADDED_COLUMNS` and added by :func:`add_missing_columns` (``ALTER TABLE ... ADD
COLUMN``, the same statement on SQLite and PostgreSQL), with the value existing rows get; an
index on such a column is in :data:`ADDED_INDEXES`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    inspect,
    text,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Mapped, mapped_column

from lib.accounts.records import DEFAULT_BUDGET, DEFAULT_MAX_CONCURRENT
from lib.clock import utc_now
from lib.db import UtcBase

USAGE_REQUEST_ID_INDEX = "ix_usage_records_request_id"
# Any constant works, as long as every sealserve process uses the same one.
_SCHEMA_LOCK_ID = 0x5EA15E7E
# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias), not a BIGINT one.
_AUTO_ID = BigInteger().with_variant(Integer(), "sqlite")


class AccountsBase(UtcBase):
    __abstract__ = True
    metadata = MetaData()


class UserRow(AccountsBase):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(_AUTO_ID, primary_key=True, autoincrement=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class ApiKeyRow(AccountsBase):
    __tablename__ = "api_keys"

    # A random string, not a sequence: it becomes the JWT subject and shows up in logs, and a
    # counter would tell anyone holding one key how many keys exist.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # sha256 hex of the full key. Keys carry 256 random bits, so a fast unsalted hash is enough:
    # there is nothing to brute-force, unlike a password.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    # Comma-separated scope names; three fixed values do not earn a join table.
    scopes: Mapped[str] = mapped_column(String(200))
    rate_limit: Mapped[str] = mapped_column(String(40))
    expires_at: Mapped[datetime | None]
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    last_used_at: Mapped[datetime | None]
    # Image-steps per window ("20000/hour") and generations at once; NULL: unlimited.
    budget: Mapped[str | None] = mapped_column(String(40))
    max_concurrent: Mapped[int | None] = mapped_column(Integer)


class UsageRow(AccountsBase):
    __tablename__ = "usage_records"
    # No foreign key to api_keys on purpose: usage is an append-only log, and a constraint failure
    # would make the recorder retry (and hold) a whole batch forever.
    __table_args__ = (
        Index("ix_usage_records_key_id_timestamp", "key_id", "timestamp"),
        Index("ix_usage_records_timestamp", "timestamp"),
        # Shipping is idempotent: a record sent twice (a replica died between the database's
        # commit and deleting its journal segment) is stored once. NULL for older rows.
        Index(USAGE_REQUEST_ID_INDEX, "request_id", unique=True),
    )

    id: Mapped[int] = mapped_column(_AUTO_ID, primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(String(32))
    endpoint: Mapped[str] = mapped_column(String(200))
    model_id: Mapped[str | None] = mapped_column(String(200))
    status_code: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    image_count: Mapped[int] = mapped_column(Integer, default=0)
    timestamp: Mapped[datetime]
    cost: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # The id the ingress gave the record (lib/accounts/records.py), never a client's X-Request-ID.
    request_id: Mapped[str | None] = mapped_column(String(32))


def insert_new_usage(dialect: str) -> Any:
    """INSERT INTO usage_records ... ON CONFLICT (request_id) DO NOTHING, in ``dialect``'s words."""
    insert_for = postgresql_insert if dialect == "postgresql" else sqlite_insert
    return insert_for(UsageRow).on_conflict_do_nothing(index_elements=[UsageRow.request_id])


# Columns added after their table first shipped: (table, column, SQL type and constraints, the
# value existing rows get as a SQL literal, or None to leave them NULL). Keys that predate
# budgets get the defaults of a new key (lib/accounts/compute.py): no key stays unbounded by
# accident of its age; an administrator can lift a limit (PATCH /v1/admin/keys/{id}).
ADDED_COLUMNS: tuple[tuple[str, str, str, str | None], ...] = (
    ("api_keys", "budget", "VARCHAR(40)", f"'{DEFAULT_BUDGET}'"),
    ("api_keys", "max_concurrent", "INTEGER", str(DEFAULT_MAX_CONCURRENT)),
    ("usage_records", "cost", "INTEGER NOT NULL DEFAULT 0", None),
    ("usage_records", "request_id", "VARCHAR(32)", None),
)
# Indexes on added columns, created when missing (the same statement on SQLite and PostgreSQL).
ADDED_INDEXES: tuple[str, ...] = (
    f"CREATE UNIQUE INDEX IF NOT EXISTS {USAGE_REQUEST_ID_INDEX} ON usage_records (request_id)",
)


def add_missing_columns(conn: Connection) -> list[str]:
    """Add the :data:`ADDED_COLUMNS` a database made by an older version lacks; returns them."""
    inspector = inspect(conn)
    added = []
    for table, column, ddl, existing_value in ADDED_COLUMNS:
        if column in {c["name"] for c in inspector.get_columns(table)}:
            continue
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}"))
        if existing_value is not None:
            # Constants of ADDED_COLUMNS only, never input.
            conn.execute(text(f"UPDATE {table} SET {column} = {existing_value}"))  # noqa: S608
        added.append(f"{table}.{column}")
    for ddl in ADDED_INDEXES:
        conn.execute(text(ddl))
    return added


def create_schema(engine: Engine) -> list[str]:
    """Create the tables, then add the columns an older database lacks; returns those added."""
    # Replicas start together; on PostgreSQL a transaction-scoped advisory lock serialises
    # their DDL. SQLite has no such lock, so a loser of the race just checks again.
    for attempt in (1, 2):
        try:
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _SCHEMA_LOCK_ID})
                AccountsBase.metadata.create_all(conn)
                return add_missing_columns(conn)
        except OperationalError as exc:
            message = str(exc.orig)
            if attempt == 2 or not ("already exists" in message or "duplicate column" in message):
                raise
    raise AssertionError("unreachable")  # pragma: no cover
