"""Request and response models of the account endpoints: tokens, own usage, and the admin API.

Durations ("30d", "90d") and rate limits ("60/minute") are validated here, so a bad value is a
422 naming the field before any route code runs.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lib.accounts.rate_limit import parse_rate_limit
from lib.accounts.records import KeyRecord, Scope, UsageStat, UsageSummary
from lib.accounts.store import UsageGrouping
from lib.durations import parse_duration
from lib.errors import ValidationFailedError
from lib.schemas import TokenResponse

__all__ = [
    "CleanupRequest",
    "CleanupResponse",
    "CreateKeyRequest",
    "CreatedKeyResponse",
    "KeyInfo",
    "KeyList",
    "TokenResponse",
    "UsageGroup",
    "UsageGrouping",
    "UsageStatsResponse",
    "UsageSummaryResponse",
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _duration(value: str) -> str:
    try:
        parse_duration(value)
    except ValidationFailedError as exc:
        raise ValueError(exc.message) from None
    return value.strip()


def _optional_duration(value: str | None) -> str | None:
    return None if value is None else _duration(value)


class CreateKeyRequest(_Request):
    """`POST /v1/admin/keys`."""

    name: str = Field(min_length=1, max_length=200, description="What the key is for.")
    scopes: list[Scope] = Field(min_length=1, description="Any of infer, classify, admin.")
    rate_limit: str = Field(
        max_length=40, description="N/second, N/minute, N/hour or N/day.", examples=["60/minute"]
    )
    expires_in: str | None = Field(
        None, max_length=20, description="Lifetime, e.g. 30d, 12h or 2w; absent: never expires."
    )
    owner_email: str | None = Field(None, max_length=320, description="Owner's email address.")

    @field_validator("rate_limit")
    @classmethod
    def _valid_rate_limit(cls, value: str) -> str:
        try:
            return str(parse_rate_limit(value))
        except ValidationFailedError as exc:
            raise ValueError(exc.message) from None

    _valid_expiry = field_validator("expires_in")(_optional_duration)


class KeyInfo(BaseModel):
    """An API key as the admin API shows it: never the key, never its hash."""

    id: str
    prefix: str = Field(description="The key's first characters, to recognise it.")
    name: str
    scopes: list[str]
    rate_limit: str
    created_at: datetime
    expires_at: datetime | None
    revoked: bool
    last_used_at: datetime | None
    owner_email: str | None

    @classmethod
    def from_record(cls, record: KeyRecord) -> KeyInfo:
        return cls(
            id=record.id,
            prefix=record.prefix,
            name=record.name,
            scopes=list(record.scopes),
            rate_limit=record.rate_limit,
            created_at=record.created_at,
            expires_at=record.expires_at,
            revoked=record.revoked,
            last_used_at=record.last_used_at,
            owner_email=record.owner_email,
        )


class CreatedKeyResponse(KeyInfo):
    # repr=False: a response model logged by accident does not leak the key.
    key: str = Field(repr=False, description="The API key: shown only in this response, store it now.")


class KeyList(BaseModel):
    keys: list[KeyInfo]
    count: int


class UsageSummaryResponse(BaseModel):
    """Totals over usage records; `success_rate` is a fraction in [0, 1] (status < 400)."""

    key_id: str | None = Field(description="The key these totals are for; null: all keys.")
    since: datetime | None
    total_requests: int
    successful_requests: int
    success_rate: float
    avg_response_time_ms: float
    total_images: int
    by_endpoint: dict[str, int] = Field(description="Requests per `METHOD /route`.")
    by_model: dict[str, int] = Field(description="Requests per model id (requests naming a model).")

    @classmethod
    def from_summary(
        cls, summary: UsageSummary, key_id: str | None, since: datetime | None
    ) -> UsageSummaryResponse:
        return cls(
            key_id=key_id,
            since=since,
            total_requests=summary.total_requests,
            successful_requests=summary.successful_requests,
            success_rate=summary.success_rate,
            avg_response_time_ms=summary.avg_response_time_ms,
            total_images=summary.total_images,
            by_endpoint=dict(summary.by_endpoint),
            by_model=dict(summary.by_model),
        )


class UsageGroup(BaseModel):
    group: str | None = Field(description="Key id, endpoint, model id or UTC day; null: no model.")
    requests: int
    successful_requests: int
    success_rate: float
    avg_response_time_ms: float
    images: int

    @classmethod
    def from_stat(cls, stat: UsageStat) -> UsageGroup:
        return cls(
            group=stat.group,
            requests=stat.requests,
            successful_requests=stat.successful_requests,
            success_rate=stat.success_rate,
            avg_response_time_ms=stat.avg_response_time_ms,
            images=stat.images,
        )


class UsageStatsResponse(BaseModel):
    by: UsageGrouping
    since: datetime | None
    groups: list[UsageGroup]


class CleanupRequest(_Request):
    """`POST /v1/admin/usage/cleanup`."""

    older_than: str = Field(max_length=20, description="Delete records older than this, e.g. 90d.")

    _valid_duration = field_validator("older_than")(_duration)


class CleanupResponse(BaseModel):
    deleted: int
    older_than: str
