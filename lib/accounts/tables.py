"""The ORM tables behind :class:`lib.accounts.store.AccountStore`: users, api_keys, usage_records.

Rows never leave :mod:`lib.accounts.store`; callers get frozen records instead (picklable across Ray, and
no lazy loads from a closed session).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Index, Integer, MetaData, String
from sqlalchemy.orm import Mapped, mapped_column

from lib.clock import utc_now
from lib.db import UtcBase

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


class UsageRow(AccountsBase):
    __tablename__ = "usage_records"
    # No foreign key to api_keys on purpose: usage is an append-only log, and a constraint failure
    # would make the recorder retry (and hold) a whole batch forever.
    __table_args__ = (
        Index("ix_usage_records_key_id_timestamp", "key_id", "timestamp"),
        Index("ix_usage_records_timestamp", "timestamp"),
    )

    id: Mapped[int] = mapped_column(_AUTO_ID, primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(String(32))
    endpoint: Mapped[str] = mapped_column(String(200))
    model_id: Mapped[str | None] = mapped_column(String(200))
    status_code: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    image_count: Mapped[int] = mapped_column(Integer, default=0)
    timestamp: Mapped[datetime]
