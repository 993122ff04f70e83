"""Authenticator: bearer API keys (bootstrap or looked up) and JWTs to a Principal; scope checks."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import jwt
import pytest

from lib.accounts.auth import ALL_SCOPES, INVALID_CREDENTIALS, Authenticator, Principal, require_scope
from lib.accounts.rate_limit import RateLimitSpec
from lib.accounts.records import KeyRecord
from lib.errors import AuthenticationError, PermissionDeniedError
from lib.tokens import TokenService

SECRET = "t" * 64  # long enough for an HS512 forgery to draw no key-length warning
OTHER_SECRET = "u" * 64
ISSUER, AUDIENCE = "sealserve", "sealserve-api"
BOOTSTRAP_KEY = "ss_bootstrap_" + "A1b2" * 10
OTHER_BOOTSTRAP_KEY = "ss_other_" + "Z9y8" * 10
STORED_KEY = "ss_stored_" + "Q7w6" * 10


def tokens(secret: str = SECRET, **kwargs: Any) -> TokenService:
    return TokenService(secret, ISSUER, AUDIENCE, **kwargs)


NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)


def record(key_id: str = "key-7", scopes: tuple[str, ...] = ("infer",), **overrides: Any) -> KeyRecord:
    values: dict[str, Any] = {
        "id": key_id, "prefix": "ss_stored", "name": "test key", "scopes": scopes,
        "rate_limit": "10/minute", "created_at": NOW - timedelta(days=1),
    }
    values.update(overrides)
    return KeyRecord(**values)


class RecordingLookup:
    """A key store fake: knows some keys (or key ids), remembers everything it was asked about."""

    def __init__(self, known: dict[str, KeyRecord] | None = None) -> None:
        self.known = known or {}
        self.calls: list[str] = []

    def __call__(self, key: str) -> KeyRecord | None:
        self.calls.append(key)
        return self.known.get(key)


def authenticator(lookup: RecordingLookup | None = None, secret: str = SECRET) -> Authenticator:
    return Authenticator(
        tokens=tokens(secret), bootstrap_keys=[BOOTSTRAP_KEY, "", OTHER_BOOTSTRAP_KEY], lookup_key=lookup
    )


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": ISSUER, "aud": AUDIENCE, "sub": "key-42", "scopes": ["classify"],
        "iat": now, "nbf": now, "exp": now + 600, "jti": "j1",
    }
    values.update(overrides)
    return values


# --- API keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [BOOTSTRAP_KEY, OTHER_BOOTSTRAP_KEY])
@pytest.mark.parametrize("template", ["Bearer {}", "bearer {}", "BEARER {}", "  Bearer   {}  "])
def test_bootstrap_key_is_accepted(key: str, template: str) -> None:
    lookup = RecordingLookup()
    principal = authenticator(lookup).authenticate(template.format(key))
    assert principal.scopes == ALL_SCOPES
    assert principal.method == "api_key"
    assert principal.subject.startswith("bootstrap:")
    assert key not in principal.subject
    assert key[:8] not in principal.subject.removeprefix("bootstrap:")
    assert lookup.calls == []  # a bootstrap key never reaches the key store


def test_bootstrap_subjects_tell_keys_apart_and_are_stable() -> None:
    auth = authenticator()
    one = auth.authenticate(f"Bearer {BOOTSTRAP_KEY}").subject
    two = auth.authenticate(f"Bearer {OTHER_BOOTSTRAP_KEY}").subject
    assert one != two
    assert auth.authenticate(f"Bearer {BOOTSTRAP_KEY}").subject == one
    assert one == "bootstrap:" + hashlib.sha256(BOOTSTRAP_KEY.encode()).hexdigest()[:12]


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "   ",
        "Bearer",
        "Bearer ",
        "Bearer    ",
        f"Basic {BOOTSTRAP_KEY}",
        f"Token {BOOTSTRAP_KEY}",
        BOOTSTRAP_KEY,
        f"Bearer{BOOTSTRAP_KEY}",
        f"Bearer {BOOTSTRAP_KEY}x",
        f"Bearer {BOOTSTRAP_KEY[:-1]}",
        f"Bearer {BOOTSTRAP_KEY.upper()}",
        "Bearer wrong-key",
    ],
    ids=[
        "missing", "empty", "blank", "scheme-only", "scheme-space", "scheme-spaces", "basic", "token",
        "no-scheme", "no-space", "key-plus-char", "key-minus-char", "key-upper", "wrong",
    ],
)
def test_bad_credentials_are_rejected(header: str | None) -> None:
    with pytest.raises(AuthenticationError) as caught:
        authenticator(RecordingLookup()).authenticate(header)
    assert BOOTSTRAP_KEY not in caught.value.message
    assert "wrong-key" not in caught.value.message
    assert caught.value.status_code == 401


def test_no_bootstrap_keys_accepts_nothing() -> None:
    auth = Authenticator(tokens=tokens(), bootstrap_keys=["", ""])
    for credential in ("", "x", BOOTSTRAP_KEY):
        with pytest.raises(AuthenticationError):
            auth.authenticate(f"Bearer {credential}")


def test_unknown_key_is_looked_up() -> None:
    lookup = RecordingLookup({STORED_KEY: record("key-7", ("classify", "infer"))})
    principal = authenticator(lookup).authenticate(f"Bearer {STORED_KEY}")
    assert principal == Principal("key-7", frozenset({"classify", "infer"}), "api_key", RateLimitSpec(10, 60))
    assert STORED_KEY not in principal.subject
    assert lookup.calls == [STORED_KEY]


def test_lookup_miss_is_rejected_without_echoing_the_key() -> None:
    lookup = RecordingLookup()
    with pytest.raises(AuthenticationError) as caught:
        authenticator(lookup).authenticate(f"Bearer {STORED_KEY}")
    assert lookup.calls == [STORED_KEY]
    assert caught.value.message == INVALID_CREDENTIALS
    assert STORED_KEY not in str(caught.value)


def test_jwt_is_not_sent_to_the_key_lookup() -> None:
    lookup = RecordingLookup()
    forged = jwt.encode(claims(), OTHER_SECRET, algorithm="HS256")
    with pytest.raises(AuthenticationError):
        authenticator(lookup).authenticate(f"Bearer {forged}")
    assert lookup.calls == []


# --- JWTs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scopes", [[], ["infer"], ["infer", "classify"], ["admin", "classify", "infer"]])
def test_valid_jwt_gives_its_subject_and_scopes(scopes: list[str]) -> None:
    token = tokens().issue("key-42", scopes).token
    principal = authenticator().authenticate(f"Bearer {token}")
    assert principal == Principal("key-42", frozenset(scopes), "jwt")


def _tampered_signature(token: str) -> str:
    head, payload, signature = token.split(".")
    # The first character carries 6 signature bits (the last one also carries padding bits).
    first = "B" if signature[0] == "A" else "A"
    return f"{head}.{payload}.{first}{signature[1:]}"


def _swapped_payload(token: str) -> str:
    head, _, signature = token.split(".")
    return f"{head}.{b64(claims(scopes=['admin']))}.{signature}"


def _alg_none_token() -> str:
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims(scopes=['admin']))}."


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(
            lambda: tokens(clock=lambda: time.time() - 3600).issue("k", ["infer"]).token, id="expired"
        ),
        pytest.param(lambda: jwt.encode(claims(aud="other-api"), SECRET, algorithm="HS256"), id="wrong-aud"),
        pytest.param(lambda: jwt.encode(claims(iss="someone"), SECRET, algorithm="HS256"), id="wrong-iss"),
        pytest.param(lambda: tokens(OTHER_SECRET).issue("k", ["admin"]).token, id="other-secret"),
        pytest.param(lambda: jwt.encode(claims(), SECRET, algorithm="HS512"), id="hs512"),
        pytest.param(_alg_none_token, id="alg-none"),
        pytest.param(lambda: _tampered_signature(tokens().issue("k", ["admin"]).token), id="bad-signature"),
        pytest.param(lambda: _swapped_payload(tokens().issue("k", ["infer"]).token), id="swapped-payload"),
    ],
)
def test_invalid_jwt_is_rejected(make_token: Any) -> None:
    token = make_token()
    lookup = RecordingLookup()
    with pytest.raises(AuthenticationError) as caught:
        authenticator(lookup).authenticate(f"Bearer {token}")
    assert caught.value.message == INVALID_CREDENTIALS
    assert token not in str(caught.value)
    assert token.split(".")[1] not in caught.value.message
    assert lookup.calls == []


# --- JWTs issued for stored keys (lookup_key_id) ----------------------------------------------------

BOOTSTRAP_LIMIT = RateLimitSpec(100, 60)


def key_id_authenticator(lookup_id: RecordingLookup) -> Authenticator:
    return Authenticator(
        tokens=tokens(),
        bootstrap_keys=[BOOTSTRAP_KEY],
        lookup_key=RecordingLookup(),
        lookup_key_id=lookup_id,
        bootstrap_rate_limit=BOOTSTRAP_LIMIT,
        clock=lambda: NOW,
    )


def test_jwt_scopes_are_bounded_by_its_stored_key() -> None:
    lookup_id = RecordingLookup({"key-7": record("key-7", ("classify", "infer"), rate_limit="5/second")})
    token = tokens().issue("key-7", ["infer", "admin"]).token
    principal = key_id_authenticator(lookup_id).authenticate(f"Bearer {token}")
    assert principal == Principal("key-7", frozenset({"infer"}), "jwt", RateLimitSpec(5, 1))
    assert lookup_id.calls == ["key-7"]


@pytest.mark.parametrize(
    "overrides",
    [{"revoked": True}, {"expires_at": NOW}, {"expires_at": NOW - timedelta(seconds=1)}],
    ids=["revoked", "expires-now", "expired"],
)
def test_jwt_dies_with_its_key(overrides: dict[str, Any]) -> None:
    lookup_id = RecordingLookup({"key-7": record("key-7", **overrides)})
    token = tokens().issue("key-7", ["infer"]).token
    with pytest.raises(AuthenticationError) as caught:
        key_id_authenticator(lookup_id).authenticate(f"Bearer {token}")
    assert caught.value.message == INVALID_CREDENTIALS


def test_jwt_of_a_key_expiring_later_is_accepted() -> None:
    lookup_id = RecordingLookup({"key-7": record("key-7", expires_at=NOW + timedelta(seconds=1))})
    token = tokens().issue("key-7", ["infer"]).token
    assert key_id_authenticator(lookup_id).authenticate(f"Bearer {token}").scopes == frozenset({"infer"})


def test_jwt_whose_key_row_no_longer_exists_is_refused() -> None:
    # Its key was deleted (or the token was minted for a subject that was never a key): no scopes
    # of its own survive, whatever the token claims.
    lookup_id = RecordingLookup()
    token = tokens().issue("deleted-key-id", ["admin", "classify"]).token
    with pytest.raises(AuthenticationError, match=INVALID_CREDENTIALS):
        key_id_authenticator(lookup_id).authenticate(f"Bearer {token}")
    assert lookup_id.calls == ["deleted-key-id"]


def test_jwt_scopes_the_service_does_not_know_are_dropped() -> None:
    token = tokens().issue("bootstrap:abc", ["classify", "no-such-scope"]).token
    principal = key_id_authenticator(RecordingLookup()).authenticate(f"Bearer {token}")
    assert principal == Principal("bootstrap:abc", frozenset({"classify"}), "jwt", BOOTSTRAP_LIMIT)


def test_jwt_of_a_bootstrap_subject_is_not_looked_up() -> None:
    lookup_id = RecordingLookup({"bootstrap:abc": record("bootstrap:abc", revoked=True)})
    token = tokens().issue("bootstrap:abc", ["admin"]).token
    principal = key_id_authenticator(lookup_id).authenticate(f"Bearer {token}")
    assert principal == Principal("bootstrap:abc", frozenset({"admin"}), "jwt", BOOTSTRAP_LIMIT)
    assert lookup_id.calls == []


def test_bootstrap_key_gets_the_bootstrap_limit() -> None:
    principal = key_id_authenticator(RecordingLookup()).authenticate(f"Bearer {BOOTSTRAP_KEY}")
    assert (principal.scopes, principal.rate_limit) == (ALL_SCOPES, BOOTSTRAP_LIMIT)


# --- scopes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", sorted(ALL_SCOPES))
def test_require_scope_passes_with_the_scope(scope: str) -> None:
    require_scope(Principal("s", frozenset({scope}), "jwt"), scope)


@pytest.mark.parametrize(
    ("held", "needed"), [((), "infer"), (("infer",), "classify"), (("infer", "classify"), "admin")]
)
def test_require_scope_denies_without_the_scope(held: tuple[str, ...], needed: str) -> None:
    with pytest.raises(PermissionDeniedError, match=needed) as caught:
        require_scope(Principal("s", frozenset(held), "api_key"), needed)
    assert caught.value.status_code == 403


def test_require_scope_rejects_unknown_scope_names() -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        require_scope(Principal("s", ALL_SCOPES, "jwt"), "superuser")


def test_bootstrap_principal_passes_every_scope() -> None:
    principal = authenticator().authenticate(f"Bearer {BOOTSTRAP_KEY}")
    for scope in ALL_SCOPES:
        require_scope(principal, scope)
