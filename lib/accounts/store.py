"""The accounts store: users, API keys and usage records in SQLite or PostgreSQL.

``AccountStore(url)`` creates its tables on first start. Keys are shown once (:class:`CreatedKey`)
and stored as a sha256 hash; lookups go by that hash and confirm it with a constant-time compare.
The store is synchronous; the ingress calls it through :class:`lib.accounts.key_cache.KeyCache` (reads) and
:class:`lib.accounts.usage.UsageRecorder` (writes), both of which keep it off the request path.

An ``AccountStore`` holds a connection pool, so it is not picklable: build one per process.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    Select,
    SQLColumnExpression,
    case,
    delete,
    func,
    literal_column,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from lib.accounts.rate_limit import parse_rate_limit
from lib.accounts.records import (
    DISPLAY_PREFIX_CHARS,
    CreatedKey,
    KeyRecord,
    Scope,
    UsageRecord,
    UsageStat,
    UsageSummary,
    generate_api_key,
    hash_api_key,
    looks_like_api_key,
    normalize_email,
    parse_scopes,
    valid_budget,
    valid_max_concurrent,
)
from lib.accounts.tables import ApiKeyRow, UsageRow, UserRow, create_schema, insert_new_usage
from lib.clock import utc_now
from lib.db import create_database_engine, database_errors, redact_url
from lib.errors import NotFoundError, ValidationFailedError

__all__ = [
    "AccountStore",
    "CreatedKey",
    "KeyRecord",
    "Scope",
    "UsageGrouping",
    "UsageRecord",
    "UsageStat",
    "UsageSummary",
]

log = logging.getLogger(__name__)

# How the database is named in a 503 and a log line.
DATABASE = "accounts"

UsageGrouping = Literal["key", "endpoint", "model", "day"]

# ``update_key``'s marker for "leave this field as it is" (None means "unlimited").
UNCHANGED: Any = object()


class AccountStore:
    """API keys and usage, in the database at ``url`` (see :func:`lib.db.resolve_database_url`)."""

    def __init__(self, url: str, *, clock: Callable[[], datetime] = utc_now) -> None:
        self._engine = create_database_engine(url)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._clock = clock
        with database_errors(DATABASE, "create the schema"):
            added = create_schema(self._engine)
        if added:
            log.info("accounts schema upgraded: added %s", ", ".join(added))
        log.debug("accounts store ready at %s", redact_url(url))

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> AccountStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- keys ------------------------------------------------------------------------------------

    def create_key(
        self,
        name: str,
        scopes: str | Sequence[str],
        rate_limit: str,
        expires_at: datetime | None = None,
        owner_email: str | None = None,
        *,
        budget: str | None = None,
        max_concurrent: int | None = None,
    ) -> CreatedKey:
        """Create a key and return its plaintext, which is not stored and cannot be shown again.

        ``budget`` (image-steps per window) and ``max_concurrent``: None is unlimited.
        """
        name = name.strip()
        if not 1 <= len(name) <= 200:
            raise ValidationFailedError("a key name must be 1 to 200 characters")
        scope_names = parse_scopes(scopes)
        limit = str(parse_rate_limit(rate_limit))
        if expires_at is not None:
            if expires_at.tzinfo is None:
                raise ValidationFailedError("expires_at must be timezone-aware")
            if expires_at <= self._clock():
                raise ValidationFailedError("expires_at must be in the future")
        email = normalize_email(owner_email) if owner_email is not None else None
        budget = valid_budget(budget)
        max_concurrent = valid_max_concurrent(max_concurrent)

        plaintext = generate_api_key()
        row = ApiKeyRow(
            id=secrets.token_hex(8),
            key_hash=hash_api_key(plaintext),
            prefix=plaintext[:DISPLAY_PREFIX_CHARS],
            name=name,
            scopes=",".join(scope_names),
            rate_limit=limit,
            expires_at=expires_at,
            revoked=False,
            created_at=self._clock(),
            budget=budget,
            max_concurrent=max_concurrent,
        )
        with database_errors(DATABASE, "create a key"), self._sessions.begin() as session:
            if email is not None:
                row.owner_id = self._user_id(session, email)
            session.add(row)
        log.info("created API key id=%s prefix=%s name=%r", row.id, row.prefix, name)
        return CreatedKey(key=plaintext, record=_key_record(row, email))

    def list_keys(self, *, include_revoked: bool = True) -> list[KeyRecord]:
        query = self._keys_query().order_by(ApiKeyRow.created_at, ApiKeyRow.id)
        if not include_revoked:
            query = query.where(ApiKeyRow.revoked.is_(False))
        with database_errors(DATABASE, "list keys"), self._sessions() as session:
            return [_key_record(row, email) for row, email in session.execute(query)]

    def get_key(self, key_id: str) -> KeyRecord | None:
        """The key with this id, revoked or expired ones included (for administration)."""
        with database_errors(DATABASE, "read a key"), self._sessions() as session:
            found = session.execute(self._keys_query().where(ApiKeyRow.id == key_id)).first()
        return _key_record(*found) if found else None

    def revoke_key(self, key_id: str) -> KeyRecord:
        """Revoke a key (idempotent). Raises :class:`NotFoundError` for an unknown id."""
        with database_errors(DATABASE, "revoke a key"), self._sessions.begin() as session:
            result = session.execute(
                update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(revoked=True)
            )
            if getattr(result, "rowcount", 0) == 0:
                raise NotFoundError(f"no API key with id {key_id[:40]!r}")
        log.info("revoked API key id=%s", key_id)
        record = self.get_key(key_id)
        assert record is not None
        return record

    def update_key(
        self,
        key_id: str,
        *,
        rate_limit: str = UNCHANGED,
        budget: str | None = UNCHANGED,
        max_concurrent: int | None = UNCHANGED,
    ) -> KeyRecord:
        """Change a key's limits (None: unlimited; :data:`UNCHANGED`: as it is). 404 for no key."""
        values: dict[str, Any] = {}
        if rate_limit is not UNCHANGED:
            values["rate_limit"] = str(parse_rate_limit(rate_limit))
        if budget is not UNCHANGED:
            values["budget"] = valid_budget(budget)
        if max_concurrent is not UNCHANGED:
            values["max_concurrent"] = valid_max_concurrent(max_concurrent)
        if values:
            with database_errors(DATABASE, "update a key"), self._sessions.begin() as session:
                session.execute(update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(**values))
            log.info("updated API key id=%s: %s", key_id, ", ".join(sorted(values)))
        record = self.get_key(key_id)
        if record is None:
            raise NotFoundError(f"no API key with id {key_id[:40]!r}")
        return record

    def lookup_key(self, plaintext: str) -> KeyRecord | None:
        """The usable key (not revoked, not expired) whose plaintext this is, else None."""
        if not looks_like_api_key(plaintext):
            return None
        return self.lookup_key_hash(hash_api_key(plaintext))

    def lookup_key_hash(self, key_hash: str) -> KeyRecord | None:
        """Like :meth:`lookup_key`, for a caller that already hashed the key (the key cache)."""
        with database_errors(DATABASE, "look up a key"), self._sessions() as session:
            found = session.execute(self._keys_query().where(ApiKeyRow.key_hash == key_hash)).first()
        if found is None:
            return None
        row, email = found
        # The database matched on the hash already; comparing again in constant time guards
        # against a collation or index that matches loosely, without leaking where bytes differ.
        if not hmac.compare_digest(row.key_hash.encode("ascii"), key_hash.encode("ascii")):
            return None
        record = _key_record(row, email)
        return record if record.is_usable(self._clock()) else None

    # -- usage -----------------------------------------------------------------------------------

    def record_usage(self, records: Sequence[UsageRecord]) -> None:
        """Write a batch in one transaction, and move each key's ``last_used_at`` forward.

        Idempotent: a record whose ``request_id`` is stored already is skipped, so a batch shipped
        again (from a usage journal, ``lib/accounts/journal.py``) is stored once.
        """
        if not records:
            return
        rows = [
            {
                "key_id": r.key_id,
                "endpoint": r.endpoint,
                "model_id": r.model_id,
                "status_code": r.status_code,
                "latency_ms": r.latency_ms,
                "image_count": r.image_count,
                "timestamp": r.timestamp,
                "cost": r.cost,
                "request_id": r.request_id,
            }
            for r in records
        ]
        last_used: dict[str, datetime] = {}
        for r in records:
            if r.key_id not in last_used or r.timestamp > last_used[r.key_id]:
                last_used[r.key_id] = r.timestamp
        with database_errors(DATABASE, "record usage"), self._sessions.begin() as session:
            session.execute(insert_new_usage(self._engine.dialect.name), rows)
            for key_id, when in last_used.items():
                session.execute(
                    update(ApiKeyRow)
                    .where(ApiKeyRow.id == key_id)
                    .where((ApiKeyRow.last_used_at.is_(None)) | (ApiKeyRow.last_used_at < when))
                    .values(last_used_at=when)
                )

    def usage_summary(self, key_id: str | None = None, since: datetime | None = None) -> UsageSummary:
        filters = self._usage_filters(key_id, since)
        totals = select(*_aggregates()).where(*filters)
        by_endpoint = (
            select(UsageRow.endpoint, func.count()).where(*filters).group_by(UsageRow.endpoint)
        )
        by_model = (
            select(UsageRow.model_id, func.count())
            .where(*filters, UsageRow.model_id.is_not(None))
            .group_by(UsageRow.model_id)
        )
        with database_errors(DATABASE, "summarize usage"), self._sessions() as session:
            requests, successes, avg_ms, images, cost = session.execute(totals).one()
            endpoints = {str(e): int(n) for e, n in session.execute(by_endpoint)}
            models = {str(m): int(n) for m, n in session.execute(by_model)}
        requests, successes = int(requests or 0), int(successes or 0)
        return UsageSummary(
            total_requests=requests,
            successful_requests=successes,
            success_rate=successes / requests if requests else 0.0,
            avg_response_time_ms=float(avg_ms or 0.0),
            total_images=int(images or 0),
            by_endpoint=dict(sorted(endpoints.items())),
            by_model=dict(sorted(models.items())),
            total_cost=int(cost or 0),
        )

    def usage_stats(self, by: UsageGrouping, since: datetime | None = None) -> list[UsageStat]:
        """Per-group totals, sorted by group (days ascending; the no-model group last)."""
        group = self._group_column(by)
        query = select(group, *_aggregates()).where(*self._usage_filters(None, since)).group_by(group)
        with database_errors(DATABASE, "compute usage stats"), self._sessions() as session:
            rows = session.execute(query).all()
        stats = [
            UsageStat(
                group=None if label is None else str(label),
                requests=int(requests),
                successful_requests=int(successes or 0),
                success_rate=int(successes or 0) / int(requests) if requests else 0.0,
                avg_response_time_ms=float(avg_ms or 0.0),
                images=int(images or 0),
                cost=int(cost or 0),
            )
            for label, requests, successes, avg_ms, images, cost in rows
        ]
        return sorted(stats, key=lambda s: (s.group is None, s.group or ""))

    def cleanup_usage(self, older_than: timedelta) -> int:
        """Delete usage records older than ``older_than``; returns how many were deleted."""
        if older_than <= timedelta(0):
            raise ValidationFailedError("older_than must be a positive duration")
        cutoff = self._clock() - older_than
        with database_errors(DATABASE, "clean up usage"), self._sessions.begin() as session:
            result = session.execute(delete(UsageRow).where(UsageRow.timestamp < cutoff))
        deleted = int(getattr(result, "rowcount", 0) or 0)
        log.info("deleted %d usage records older than %s", deleted, cutoff.isoformat())
        return deleted

    # -- internals -------------------------------------------------------------------------------

    @staticmethod
    def _keys_query() -> Select[ApiKeyRow, str]:
        return select(ApiKeyRow, UserRow.email).outerjoin(UserRow, ApiKeyRow.owner_id == UserRow.id)

    @staticmethod
    def _usage_filters(key_id: str | None, since: datetime | None) -> list[ColumnElement[bool]]:
        filters: list[ColumnElement[bool]] = []
        if key_id is not None:
            filters.append(UsageRow.key_id == key_id)
        if since is not None:
            if since.tzinfo is None:
                raise ValidationFailedError("since must be timezone-aware")
            filters.append(UsageRow.timestamp >= since)
        return filters

    def _group_column(self, by: UsageGrouping) -> SQLColumnExpression[Any]:
        if by == "key":
            return UsageRow.key_id
        if by == "endpoint":
            return UsageRow.endpoint
        if by == "model":
            return UsageRow.model_id
        if by == "day":
            # Days are UTC days on both backends: SQLite holds naive UTC, PostgreSQL converts.
            if self._engine.dialect.name == "postgresql":
                # Literals, not bound parameters: PostgreSQL only accepts the SELECT expression as
                # the GROUP BY one if both are textually identical, and $1 is not $3.
                utc = func.timezone(literal_column("'UTC'"), UsageRow.timestamp)
                return func.to_char(utc, literal_column("'YYYY-MM-DD'"))
            return func.strftime(literal_column("'%Y-%m-%d'"), UsageRow.timestamp)
        raise ValidationFailedError(
            f"cannot group usage by {str(by)[:20]!r}: use key, endpoint, model or day"
        )

    @staticmethod
    def _user_id(session: Session, email: str) -> int:
        existing = session.scalar(select(UserRow.id).where(UserRow.email == email))
        if existing is not None:
            return existing
        # Two keys for a new owner may be created at once; the loser re-reads the winner's row.
        try:
            with session.begin_nested():
                user = UserRow(email=email)
                session.add(user)
            return user.id
        except IntegrityError:
            found = session.scalar(select(UserRow.id).where(UserRow.email == email))
            if found is None:
                raise
            return found


def _aggregates() -> tuple[ColumnElement[Any], ...]:
    return (
        func.count(),
        func.sum(case((UsageRow.status_code < 400, 1), else_=0)),
        func.avg(UsageRow.latency_ms),
        func.sum(UsageRow.image_count),
        func.sum(UsageRow.cost),
    )


def _key_record(row: ApiKeyRow, owner_email: str | None) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        prefix=row.prefix,
        name=row.name,
        scopes=tuple(s for s in row.scopes.split(",") if s),
        rate_limit=row.rate_limit,
        created_at=row.created_at,
        owner_email=owner_email,
        expires_at=row.expires_at,
        revoked=bool(row.revoked),
        last_used_at=row.last_used_at,
        budget=row.budget,
        max_concurrent=row.max_concurrent,
    )

