"""Who is calling: ``Authorization: Bearer <API key | JWT>`` to a ``Principal`` with scopes and a limit.

Three kinds of credential are accepted, checked in this order:

* a JWT (three dot-separated segments; API keys never contain a dot), verified by the
  :class:`lib.tokens.TokenService`. Its ``sub`` is the id of the API key it was issued for: that
  key must still exist and be usable (a token dies with its key, within the lookup cache's TTL),
  its scopes bound the token's, and its rate limit applies. Only a bootstrap key's token (subject
  ``bootstrap:…``) has no stored key: it keeps its own scopes and gets the bootstrap rate limit;
* a bootstrap key from ``API_KEYS`` (all scopes, the bootstrap rate limit);
* a stored API key, found through ``lookup_key`` (the per-replica :class:`lib.accounts.key_cache.KeyCache`).

The lookups are synchronous and may hit the database on a cache miss, so an async caller tries
:meth:`Authenticator.authenticate` from memory first (``lib.ttl_cache.memory_only``) and runs it in
a thread only on a miss (:class:`lib.accounts.gate.RequestGate` does).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from lib.accounts.rate_limit import RateLimitSpec
from lib.accounts.records import KeyRecord, Scope, hash_api_key
from lib.clock import utc_now
from lib.errors import AuthenticationError, PermissionDeniedError
from lib.observability import metrics
from lib.tokens import looks_like_jwt

ALL_SCOPES: frozenset[str] = frozenset(scope.value for scope in Scope)
BOOTSTRAP_SUBJECT_PREFIX = "bootstrap:"
# One message for every failure: a caller learns nothing about why a credential was refused.
INVALID_CREDENTIALS = "invalid or expired credentials"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    ``subject`` identifies the credential without revealing it: a stored key's id (also the ``sub``
    of the JWTs issued for it), or ``bootstrap:`` and 12 hex digits of a bootstrap key's hash. It is
    what rate limits and usage are counted against. ``rate_limit`` None means unlimited.
    """

    subject: str
    scopes: frozenset[str]
    method: Literal["api_key", "jwt"]
    rate_limit: RateLimitSpec | None = None
    # Image-steps per window and generations at once (lib/accounts/compute.py); None: unlimited.
    budget: RateLimitSpec | None = None
    max_concurrent: int | None = None


class _Claims(Protocol):
    @property
    def subject(self) -> str: ...

    @property
    def scopes(self) -> Sequence[str]: ...


class TokenVerifier(Protocol):
    def verify(self, token: str) -> _Claims: ...


KeyLookup = Callable[[str], KeyRecord | None]


def bootstrap_subject(key: str) -> str:
    return BOOTSTRAP_SUBJECT_PREFIX + hash_api_key(key)[:12]


class Authenticator:
    """Checks bearer credentials: JWTs, bootstrap API keys, then stored API keys."""

    def __init__(
        self,
        *,
        tokens: TokenVerifier,
        bootstrap_keys: Sequence[str] = (),
        lookup_key: KeyLookup | None = None,
        lookup_key_id: KeyLookup | None = None,
        bootstrap_rate_limit: RateLimitSpec | None = None,
        bootstrap_budget: RateLimitSpec | None = None,
        bootstrap_max_concurrent: int | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """``lookup_key``: plaintext key -> its *usable* record, or None (e.g. ``KeyCache.get``).
        ``lookup_key_id``: key id -> its record, revoked and expired ones included, or None (e.g. a
        cached ``AccountStore.get_key``)."""
        self._tokens = tokens
        self._bootstrap = [hash_api_key(k).encode("ascii") for k in bootstrap_keys if k]
        self._lookup_key = lookup_key
        self._lookup_key_id = lookup_key_id
        self._bootstrap_rate_limit = bootstrap_rate_limit
        self._bootstrap_compute = (bootstrap_budget, bootstrap_max_concurrent)
        self._clock = clock

    def authenticate(self, authorization: str | None) -> Principal:
        scheme, _, credential = (authorization or "").strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            metrics.auth_failure("missing")
            raise AuthenticationError("missing bearer credentials: send 'Authorization: Bearer <key>'")
        if looks_like_jwt(credential):
            return self._token_principal(credential)
        digest = hash_api_key(credential).encode("ascii")
        # Compare against every bootstrap key so the time taken does not tell which one matched.
        matched = False
        for known in self._bootstrap:
            matched |= hmac.compare_digest(digest, known)
        if matched:
            return Principal(
                bootstrap_subject(credential), ALL_SCOPES, "api_key", self._bootstrap_rate_limit,
                *self._bootstrap_compute,
            )
        if self._lookup_key is not None:
            record = self._lookup_key(credential)
            if record is not None:
                return Principal(
                    record.id, frozenset(record.scopes), "api_key", record.rate_limit_spec,
                    *record.compute_limits,
                )
        metrics.auth_failure("unknown_key")
        raise AuthenticationError(INVALID_CREDENTIALS)

    def _token_principal(self, token: str) -> Principal:
        try:
            claims = self._tokens.verify(token)
        except AuthenticationError:
            metrics.auth_failure("invalid_token")
            raise AuthenticationError(INVALID_CREDENTIALS) from None
        scopes = ALL_SCOPES.intersection(claims.scopes)
        subject = claims.subject
        if self._lookup_key_id is not None and not subject.startswith(BOOTSTRAP_SUBJECT_PREFIX):
            record = self._lookup_key_id(subject)
            # A key row that no longer exists (deleted) ends its tokens like a revoked one.
            if record is None or not record.is_usable(self._clock()):
                metrics.auth_failure("unusable_key")
                raise AuthenticationError(INVALID_CREDENTIALS)
            return Principal(
                subject, scopes.intersection(record.scopes), "jwt", record.rate_limit_spec,
                *record.compute_limits,
            )
        return Principal(subject, scopes, "jwt", self._bootstrap_rate_limit, *self._bootstrap_compute)


def require_scope(principal: Principal, scope: Scope | str) -> None:
    try:
        name = Scope(scope).value
    except ValueError:  # a route asking for a scope that does not exist is a bug, not a 403
        raise ValueError(f"unknown scope {str(scope)[:20]!r}") from None
    if name not in principal.scopes:
        raise PermissionDeniedError(f"this credential lacks the '{name}' scope")
