"""Who is calling: ``Authorization: Bearer <API key | JWT>`` to a ``Principal`` with scopes."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from lib.errors import AuthenticationError, PermissionDeniedError
from lib.tokens import looks_like_jwt

Scope = Literal["infer", "classify", "admin"]
ALL_SCOPES: frozenset[str] = frozenset({"infer", "classify", "admin"})
# One message for every failure: a caller learns nothing about why a credential was refused.
INVALID_CREDENTIALS = "invalid or expired credentials"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``subject`` identifies the key (never the key itself)."""

    subject: str
    scopes: frozenset[str]
    method: Literal["api_key", "jwt"]
    rate_limit: str | None = None


class _Claims(Protocol):
    @property
    def subject(self) -> str: ...

    @property
    def scopes(self) -> Sequence[str]: ...


class TokenVerifier(Protocol):
    def verify(self, token: str) -> _Claims: ...


KeyLookup = Callable[[str], Principal | None]


def key_digest(key: str) -> bytes:
    # API keys are >= 32 random bytes, so a plain SHA-256 is a safe at-rest form of them.
    return hashlib.sha256(key.encode()).digest()


class Authenticator:
    """Checks bearer credentials: bootstrap API keys, stored API keys, then JWTs."""

    def __init__(
        self,
        *,
        tokens: TokenVerifier,
        bootstrap_keys: Sequence[str] = (),
        lookup_key: KeyLookup | None = None,
    ) -> None:
        self._tokens = tokens
        self._bootstrap = [key_digest(k) for k in bootstrap_keys if k]
        self._lookup_key = lookup_key

    def authenticate(self, authorization: str | None) -> Principal:
        scheme, _, credential = (authorization or "").strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthenticationError("missing bearer credentials: send 'Authorization: Bearer <key>'")
        if looks_like_jwt(credential):
            try:
                claims = self._tokens.verify(credential)
            except AuthenticationError:
                raise AuthenticationError(INVALID_CREDENTIALS) from None
            return Principal(claims.subject, frozenset(claims.scopes), "jwt")
        digest = key_digest(credential)
        # Compare against every bootstrap key so the time taken does not tell which one matched.
        matched = False
        for known in self._bootstrap:
            matched |= hmac.compare_digest(digest, known)
        if matched:
            return Principal(f"bootstrap:{digest.hex()[:12]}", ALL_SCOPES, "api_key")
        if self._lookup_key is not None:
            principal = self._lookup_key(credential)
            if principal is not None:
                return principal
        raise AuthenticationError(INVALID_CREDENTIALS)


def require_scope(principal: Principal, scope: str, *, allowed: Collection[str] = ALL_SCOPES) -> None:
    if scope not in allowed:
        raise ValueError(f"unknown scope {scope}")
    if scope not in principal.scopes:
        raise PermissionDeniedError(f"this credential lacks the '{scope}' scope")
