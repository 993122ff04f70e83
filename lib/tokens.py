"""Short-lived JWTs issued for an API key, so a client can avoid sending the long-lived key each time.

The algorithm is pinned server-side to HS256: the token's own ``alg`` header is never trusted, so
``alg: none`` and algorithm-confusion tokens are rejected. ``exp``, ``iat``, ``nbf``, ``iss``,
``aud`` and ``sub`` are required; the HMAC secret must be at least 32 bytes. Every failure is the
same :class:`AuthenticationError` with a generic message: telling a client *why* its token failed
helps an attacker more than an honest client, and the token never appears in a message or log.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import jwt

from lib.errors import AuthenticationError, ConfigurationError

log = logging.getLogger(__name__)

ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32
# Long enough to absorb clock skew between the issuing and the verifying replica, short enough
# not to stretch a 15-minute token noticeably.
DEFAULT_LEEWAY_S = 10
# Our tokens are a few hundred bytes; refusing huge ones keeps decoding cheap under abuse.
MAX_TOKEN_CHARS = 4096
_REQUIRED_CLAIMS = ["exp", "iat", "nbf", "iss", "aud", "sub"]
_INVALID = "invalid or expired token"
_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


def looks_like_jwt(candidate: str) -> bool:
    """True for three base64url segments joined by dots (the signature may be empty).

    A shape test only, for routing a bearer credential to the JWT or the API key check; API keys
    (``ss_...``) never contain a dot. An unsigned token looks like a JWT on purpose, so that it
    reaches :meth:`TokenService.verify` and is rejected there.
    """
    return len(candidate) <= MAX_TOKEN_CHARS and bool(_JWT_SHAPE.match(candidate))


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_in: int

    def __repr__(self) -> str:
        return f"IssuedToken(token=<redacted>, expires_in={self.expires_in})"


@dataclass(frozen=True)
class TokenClaims:
    subject: str
    scopes: tuple[str, ...]
    expires_at: datetime
    jti: str


class TokenService:
    """Issues and verifies HS256 JWTs whose subject is an API key id."""

    def __init__(
        self,
        secret: str,
        issuer: str,
        audience: str,
        ttl_s: int = 900,
        *,
        leeway_s: int = DEFAULT_LEEWAY_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(secret.encode("utf-8")) < MIN_SECRET_BYTES:
            raise ConfigurationError(f"the token secret must be at least {MIN_SECRET_BYTES} bytes")
        if not issuer or not audience:
            raise ConfigurationError("the token issuer and audience must not be empty")
        if ttl_s < 1:
            raise ConfigurationError("the token lifetime must be at least one second")
        self._secret = secret
        self._issuer = issuer
        self._audience = audience
        self._ttl_s = ttl_s
        self._leeway_s = leeway_s
        self._clock = clock

    def __repr__(self) -> str:
        return f"TokenService(issuer={self._issuer!r}, audience={self._audience!r}, ttl_s={self._ttl_s})"

    def issue(self, subject: str, scopes: Sequence[str]) -> IssuedToken:
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": subject,
            "scopes": [str(getattr(scope, "value", scope)) for scope in scopes],
            "iat": now,
            "nbf": now,
            "exp": now + self._ttl_s,
            "jti": secrets.token_urlsafe(16),
        }
        token = jwt.encode(claims, self._secret, algorithm=ALGORITHM)
        return IssuedToken(token=token, expires_in=self._ttl_s)

    def verify(self, token: str) -> TokenClaims:
        """The token's claims, or :class:`AuthenticationError` for any kind of invalid token."""
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthenticationError(_INVALID)
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway_s,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError as exc:
            log.info("rejected a bearer token: %s", type(exc).__name__)
            raise AuthenticationError(_INVALID) from None
        subject, scopes, jti = claims.get("sub"), claims.get("scopes"), claims.get("jti")
        # A well-signed token with the wrong claim types can only come from a bug or a leaked
        # secret; either way it must not authenticate.
        if not (
            isinstance(subject, str)
            and subject
            and isinstance(jti, str)
            and isinstance(scopes, list)
            and all(isinstance(scope, str) for scope in scopes)
        ):
            log.warning("rejected a correctly signed token with malformed claims")
            raise AuthenticationError(_INVALID)
        return TokenClaims(
            subject=subject,
            scopes=tuple(scopes),
            expires_at=datetime.fromtimestamp(int(claims["exp"]), tz=timezone.utc),
            jti=jti,
        )
