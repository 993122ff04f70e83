"""The values :class:`lib.accounts.store.AccountStore` takes and returns, plus scopes and the key format.

All records are frozen dataclasses of plain values: they pickle across Ray process boundaries and
never hold a database session. Nothing here touches the database.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

from lib.accounts.rate_limit import RateLimitSpec, parse_budget, parse_rate_limit
from lib.clock import utc_now
from lib.errors import ValidationFailedError

API_KEY_PREFIX = "ss_"
API_KEY_RANDOM_BYTES = 32
# Enough of the key to tell keys apart in a listing, far too little to help guess the rest
# (7 of 43 random characters).
DISPLAY_PREFIX_CHARS = 10
_API_KEY_PATTERN = re.compile(r"^ss_[A-Za-z0-9_-]{43}$")


class Scope(str, Enum):
    INFER = "infer"
    CLASSIFY = "classify"
    ADMIN = "admin"


def parse_scopes(scopes: str | Iterable[str]) -> tuple[str, ...]:
    """Validate scope names (a comma-separated string or an iterable) into canonical order."""
    names = scopes.split(",") if isinstance(scopes, str) else list(scopes)
    wanted = {str(getattr(name, "value", name)).strip().lower() for name in names}
    wanted.discard("")
    valid = [scope.value for scope in Scope]
    unknown = sorted(wanted.difference(valid))
    if unknown:
        shown = ", ".join(repr(name[:20]) for name in unknown[:5])
        raise ValidationFailedError(f"unknown scope(s) {shown}: expected some of {', '.join(valid)}")
    if not wanted:
        raise ValidationFailedError(f"at least one scope is required: {', '.join(valid)}")
    return tuple(scope for scope in valid if scope in wanted)


# The limits of a new key (CLI and admin API) and of a key made before budgets existed:
# 20,000 image-steps an hour is ~660 generations of 512x512 at 30 steps, or 8 of the most
# expensive request (4 images, 1024x1024, 150 steps: 2,400 image-steps); two generations at once
# leave the rest of a replica's capacity to other keys. Documented in docs/accounts.md.
DEFAULT_BUDGET = "20000/hour"
DEFAULT_MAX_CONCURRENT = 2
# Generations at once a key may be given (a cap, not a promise of capacity).
MAX_CONCURRENT_LIMIT = 1000


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    local, at, domain = email.partition("@")
    if not (at and local and "." in domain and len(email) <= 320 and " " not in email):
        raise ValidationFailedError("the owner must be an email address")
    return email


def valid_budget(budget: str | None) -> str | None:
    """A budget spec in canonical form ("20000/hour"), or None (unlimited)."""
    return None if budget is None else str(parse_budget(budget))


def valid_max_concurrent(max_concurrent: int | None) -> int | None:
    if max_concurrent is not None and not 1 <= max_concurrent <= MAX_CONCURRENT_LIMIT:
        raise ValidationFailedError(f"max_concurrent must be between 1 and {MAX_CONCURRENT_LIMIT}")
    return max_concurrent


def generate_api_key() -> str:
    """A new key: ``ss_`` and 32 random bytes, base64url without padding (46 characters)."""
    random_part = base64.urlsafe_b64encode(secrets.token_bytes(API_KEY_RANDOM_BYTES))
    return API_KEY_PREFIX + random_part.rstrip(b"=").decode("ascii")


def hash_api_key(key: str) -> str:
    """The stored form of a key: sha256 hex. Also the key cache's dictionary key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def looks_like_api_key(candidate: str) -> bool:
    """Cheap shape check, so garbage is rejected without hashing or a database round trip."""
    return bool(_API_KEY_PATTERN.match(candidate))


@dataclass(frozen=True)
class KeyRecord:
    """An API key as stored, without its secret. ``scopes`` are :class:`Scope` values.

    ``budget`` (image-steps per window, e.g. ``20000/hour``) and ``max_concurrent`` (generations
    at once): None means unlimited (``lib/accounts/compute.py``).
    """

    id: str
    prefix: str
    name: str
    scopes: tuple[str, ...]
    rate_limit: str
    created_at: datetime
    owner_email: str | None = None
    expires_at: datetime | None = None
    revoked: bool = False
    last_used_at: datetime | None = None
    budget: str | None = None
    max_concurrent: int | None = None

    @property
    def rate_limit_spec(self) -> RateLimitSpec:
        return parse_rate_limit(self.rate_limit)

    @property
    def compute_limits(self) -> tuple[RateLimitSpec | None, int | None]:
        """(budget, max_concurrent) as the gate applies them."""
        return (parse_budget(self.budget) if self.budget else None), self.max_concurrent

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def is_usable(self, now: datetime) -> bool:
        return not self.revoked and not self.is_expired(now)


@dataclass(frozen=True)
class CreatedKey:
    """The result of creating a key: the only time the plaintext ``key`` exists outside its owner.

    ``repr`` leaves the key out, so logging this object by accident does not leak it.
    """

    key: str = field(repr=False)
    record: KeyRecord


@dataclass(frozen=True)
class UsageRecord:
    """One served request, as the ingress reports it; ``timestamp`` must be timezone-aware.

    ``request_id`` makes shipping idempotent (one row per id, ``lib/accounts/journal.py``). It is
    made here, by the server, for every record: a client's ``X-Request-ID`` would let a client
    that repeats one id have all but the first of its requests go unbilled.
    """

    key_id: str
    endpoint: str
    status_code: int
    latency_ms: float
    model_id: str | None = None
    image_count: int = 0
    timestamp: datetime = field(default_factory=utc_now)
    cost: int = 0  # image-steps charged (lib/accounts/compute.py)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if self.timestamp.tzinfo is None:
            raise ValueError("UsageRecord.timestamp must be timezone-aware")


@dataclass(frozen=True)
class UsageSummary:
    """Totals over a set of usage records. ``success_rate`` is a fraction in [0, 1] (status < 400).

    ``by_endpoint`` and ``by_model`` count requests; requests that never reached a model (e.g.
    rejected by validation) count in the totals but not in ``by_model``.
    """

    total_requests: int
    successful_requests: int
    success_rate: float
    avg_response_time_ms: float
    total_images: int
    by_endpoint: Mapping[str, int]
    by_model: Mapping[str, int]
    total_cost: int = 0  # image-steps charged


@dataclass(frozen=True)
class UsageStat:
    """Totals for one group of :meth:`AccountStore.usage_stats`; ``group`` is None for no model."""

    group: str | None
    requests: int
    successful_requests: int
    success_rate: float
    avg_response_time_ms: float
    images: int
    cost: int = 0  # image-steps charged
