"""Request and response models of the account endpoints: tokens, own usage, and the admin API.

Durations ("30d", "90d") and rate limits ("60/minute") are validated here, so a bad value is a
422 naming the field before any route code runs.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lib.accounts.rate_limit import budget_field, rate_limit_field
from lib.accounts.records import (
    DEFAULT_BUDGET,
    DEFAULT_MAX_CONCURRENT,
    MAX_CONCURRENT_LIMIT,
    KeyRecord,
    Scope,
    UsageStat,
    UsageSummary,
)
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
    "UpdateKeyRequest",
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


_BUDGET_DESCRIPTION = (
    "Compute budget in image-steps per window (one denoising step of one 512x512 image), as "
    "N/second|minute|hour|day; null: unlimited."
)
_MAX_CONCURRENT_DESCRIPTION = "Most generations this key may run at once; null: unlimited."


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
    budget: str | None = Field(
        DEFAULT_BUDGET, max_length=40, description=_BUDGET_DESCRIPTION, examples=[DEFAULT_BUDGET]
    )
    max_concurrent: int | None = Field(
        DEFAULT_MAX_CONCURRENT, ge=1, le=MAX_CONCURRENT_LIMIT, description=_MAX_CONCURRENT_DESCRIPTION
    )

    _valid_rate_limit = field_validator("rate_limit")(rate_limit_field)
    _valid_budget = field_validator("budget")(budget_field)
    _valid_expiry = field_validator("expires_in")(_optional_duration)


class UpdateKeyRequest(_Request):
    """`PATCH /v1/admin/keys/{key_id}`: the fields present are changed (null: unlimited)."""

    rate_limit: str | None = Field(None, max_length=40, description="N/second, N/minute, N/hour or N/day.")
    budget: str | None = Field(None, max_length=40, description=_BUDGET_DESCRIPTION)
    max_concurrent: int | None = Field(
        None, ge=1, le=MAX_CONCURRENT_LIMIT, description=_MAX_CONCURRENT_DESCRIPTION
    )

    _valid_rate_limit = field_validator("rate_limit")(rate_limit_field)
    _valid_budget = field_validator("budget")(budget_field)

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_required(cls, value: str | None) -> str:
        if value is None:  # every key has a rate limit
            raise ValueError("a key's rate limit cannot be removed")
        return value

    def changes(self) -> dict[str, str | int | None]:
        """The fields the request names, with their new values."""
        return {name: getattr(self, name) for name in self.model_fields_set}


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
    budget: str | None = Field(None, description="Image-steps per window; null: unlimited.")
    max_concurrent: int | None = Field(None, description="Generations at once; null: unlimited.")

    @classmethod
    def from_record(cls, record: KeyRecord) -> KeyInfo:
        return cls(
            id=record.id,
            prefix=record.prefix,
            name=record.name,
            scopes=list(record.scopes),
            rate_limit=record.rate_limit,
            budget=record.budget,
            max_concurrent=record.max_concurrent,
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
    total_cost: int = Field(description="Image-steps charged to the compute budget.")
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
            total_cost=summary.total_cost,
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
    cost: int = Field(description="Image-steps charged to the compute budget.")

    @classmethod
    def from_stat(cls, stat: UsageStat) -> UsageGroup:
        return cls(
            group=stat.group,
            requests=stat.requests,
            successful_requests=stat.successful_requests,
            success_rate=stat.success_rate,
            avg_response_time_ms=stat.avg_response_time_ms,
            images=stat.images,
            cost=stat.cost,
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
