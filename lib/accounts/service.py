"""What the account routes do: token exchange, own usage, and key/usage administration.

Each method is the one call a route makes. They are synchronous and most of them reach the
database, so the ingress runs them with ``asyncio.to_thread``; none of them is on the path of an
ordinary (inference) request.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from lib.accounts.auth import Principal
from lib.accounts.schemas import (
    CleanupRequest,
    CleanupResponse,
    CreatedKeyResponse,
    CreateKeyRequest,
    KeyInfo,
    KeyList,
    TokenResponse,
    UpdateKeyRequest,
    UsageGroup,
    UsageGrouping,
    UsageStatsResponse,
    UsageSummaryResponse,
)
from lib.accounts.store import AccountStore
from lib.clock import utc_now
from lib.durations import parse_duration, parse_since
from lib.errors import NotFoundError, PermissionDeniedError
from lib.tokens import TokenService


def _ignore(_key_id: str) -> None:
    return None


class AccountService:
    def __init__(
        self,
        store: AccountStore,
        tokens: TokenService,
        *,
        on_revoked: Callable[[str], None] = _ignore,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """``on_revoked(key_id)`` lets this process forget a revoked key at once (others wait for
        their cache TTL)."""
        self._store = store
        self._tokens = tokens
        self._on_revoked = on_revoked
        self._clock = clock

    # -- any authenticated caller ------------------------------------------------------------

    def issue_token(self, principal: Principal) -> TokenResponse:
        """A short-lived JWT for the API key the caller authenticated with, with the key's scopes."""
        if principal.method != "api_key":
            # A token must not renew itself: its lifetime is the point of having it.
            raise PermissionDeniedError("a token can only be obtained with an API key")
        scopes = sorted(principal.scopes)
        issued = self._tokens.issue(principal.subject, scopes)
        return TokenResponse(access_token=issued.token, expires_in=issued.expires_in, scope=" ".join(scopes))

    def own_usage(self, principal: Principal, since: str | None = None) -> UsageSummaryResponse:
        return self.usage_summary(principal.subject, since)

    # -- admin -------------------------------------------------------------------------------

    def create_key(self, request: CreateKeyRequest) -> CreatedKeyResponse:
        expires_at = self._clock() + parse_duration(request.expires_in) if request.expires_in else None
        created = self._store.create_key(
            request.name,
            [scope.value for scope in request.scopes],
            request.rate_limit,
            expires_at=expires_at,
            owner_email=request.owner_email,
            budget=request.budget,
            max_concurrent=request.max_concurrent,
        )
        info = KeyInfo.from_record(created.record)
        return CreatedKeyResponse(**info.model_dump(), key=created.key)

    def list_keys(self, include_revoked: bool = True) -> KeyList:
        keys = [KeyInfo.from_record(r) for r in self._store.list_keys(include_revoked=include_revoked)]
        return KeyList(keys=keys, count=len(keys))

    def get_key(self, key_id: str) -> KeyInfo:
        record = self._store.get_key(key_id)
        if record is None:
            raise NotFoundError(f"no API key with id {key_id[:40]!r}")
        return KeyInfo.from_record(record)

    def update_key(self, key_id: str, request: UpdateKeyRequest) -> KeyInfo:
        """Change a key's limits; every replica applies them within the key cache TTL (this one
        at once, for the tokens of the key)."""
        record = self._store.update_key(key_id, **request.changes())  # type: ignore[arg-type]
        self._on_revoked(key_id)
        return KeyInfo.from_record(record)

    def revoke_key(self, key_id: str) -> KeyInfo:
        record = self._store.revoke_key(key_id)
        self._on_revoked(key_id)
        return KeyInfo.from_record(record)

    def usage_summary(self, key_id: str | None = None, since: str | None = None) -> UsageSummaryResponse:
        moment = self._since(since)
        summary = self._store.usage_summary(key_id=key_id, since=moment)
        return UsageSummaryResponse.from_summary(summary, key_id, moment)

    def usage_stats(self, by: UsageGrouping, since: str | None = None) -> UsageStatsResponse:
        moment = self._since(since)
        groups = [UsageGroup.from_stat(stat) for stat in self._store.usage_stats(by, since=moment)]
        return UsageStatsResponse(by=by, since=moment, groups=groups)

    def cleanup_usage(self, request: CleanupRequest) -> CleanupResponse:
        deleted = self._store.cleanup_usage(parse_duration(request.older_than))
        return CleanupResponse(deleted=deleted, older_than=request.older_than)

    def _since(self, since: str | None) -> datetime | None:
        return parse_since(since, self._clock()) if since else None
