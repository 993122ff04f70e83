"""TokenService: valid tokens verify; every kind of bad token is the same generic 401."""

from __future__ import annotations

import base64
import json
import logging
import pickle
import time
from typing import Any

import jwt
import pytest

from lib.errors import AuthenticationError, ConfigurationError
from lib.tokens import TokenService, looks_like_jwt

SECRET = "s" * 64  # long enough that forging an HS512 token with it draws no key-length warning
OTHER_SECRET = "o" * 32


def service(**overrides: Any) -> TokenService:
    arguments: dict[str, Any] = {"secret": SECRET, "issuer": "sealserve", "audience": "sealserve-api"}
    arguments.update(overrides)
    return TokenService(**arguments)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": "sealserve", "aud": "sealserve-api", "sub": "key1", "scopes": ["infer"],
        "iat": now, "nbf": now, "exp": now + 600, "jti": "j1",
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def test_issued_token_verifies_with_its_claims() -> None:
    tokens = service(ttl_s=600)
    issued = tokens.issue("key1", ["infer", "classify"])
    assert issued.expires_in == 600
    assert looks_like_jwt(issued.token)
    assert jwt.get_unverified_header(issued.token)["alg"] == "HS256"
    verified = tokens.verify(issued.token)
    assert verified.subject == "key1"
    assert verified.scopes == ("infer", "classify")
    assert abs(verified.expires_at.timestamp() - (time.time() + 600)) < 60
    raw = jwt.decode(issued.token, options={"verify_signature": False})
    assert set(raw) == {"iss", "aud", "sub", "scopes", "exp", "iat", "nbf", "jti"}
    assert raw["jti"] == verified.jti
    assert tokens.issue("key1", ["infer"]).token != issued.token  # fresh jti every time
    assert pickle.loads(pickle.dumps(verified)) == verified  # noqa: S301 - our own bytes


def _forged_tokens() -> dict[str, str]:
    header = {"alg": "HS256", "typ": "JWT"}
    long_ago = int(time.time()) - 3600
    in_an_hour = int(time.time()) + 3600
    return {
        "expired": service(clock=lambda: time.time() - 2000, ttl_s=900).issue("key1", ["infer"]).token,
        "not yet valid": service(clock=lambda: time.time() + 3600).issue("key1", ["infer"]).token,
        "other secret": service(secret=OTHER_SECRET).issue("key1", ["infer"]).token,
        "wrong audience": service(audience="someone-else").issue("key1", ["infer"]).token,
        "wrong issuer": service(issuer="evil").issue("key1", ["infer"]).token,
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}.",
        "alg none with a signature": f"{b64({'alg': 'none'})}.{b64(claims())}.c2ln",
        "alg NONE": f"{b64({'alg': 'NONE'})}.{b64(claims())}.",
        "HS512 with the right secret": jwt.encode(claims(), SECRET, algorithm="HS512"),
        "no nbf": jwt.encode(claims(nbf=None), SECRET, algorithm="HS256"),
        "no exp": jwt.encode(claims(exp=None), SECRET, algorithm="HS256"),
        "no sub": jwt.encode(claims(sub=None), SECRET, algorithm="HS256"),
        "scopes not a list": jwt.encode(claims(scopes="admin"), SECRET, algorithm="HS256"),
        "no jti": jwt.encode(claims(jti=None), SECRET, algorithm="HS256"),
        "nbf in the future": jwt.encode(claims(nbf=in_an_hour), SECRET, algorithm="HS256"),
        "exp in the past": jwt.encode(claims(exp=long_ago), SECRET, algorithm="HS256"),
        "tampered payload": _tampered(),
        "header only": b64(header),
        "garbage segments": "abc.def.ghi",
        "empty": "",
        "not base64": "e30.!!!.x",
        "huge": "a" * 5000 + ".b.c",
    }


def _tampered() -> str:
    token = service().issue("key1", ["infer"]).token
    header, _payload, signature = token.split(".")
    return f"{header}.{b64(claims(scopes=['admin']))}.{signature}"


FORGED = _forged_tokens()


@pytest.mark.parametrize("case", sorted(FORGED))
def test_bad_tokens_are_one_generic_authentication_error(case: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = FORGED[case]
    with pytest.raises(AuthenticationError) as info:
        service().verify(token)
    assert info.value.message == "invalid or expired token"
    assert info.value.status_code == 401
    assert info.value.__cause__ is None  # no pyjwt detail travels with the error
    if token:
        assert all(token not in line for line in caplog.messages)


def test_a_small_clock_skew_is_tolerated() -> None:
    skewed = service(clock=lambda: time.time() + 3).issue("key1", ["infer"]).token
    assert service().verify(skewed).subject == "key1"


@pytest.mark.parametrize("secret", ["", "short", "x" * 31, "é" * 15])
def test_secrets_shorter_than_32_bytes_are_refused(secret: str) -> None:
    with pytest.raises(ConfigurationError, match="32 bytes"):
        service(secret=secret)


def test_secret_length_counts_bytes_and_repr_hides_it() -> None:
    tokens = service(secret="é" * 16)  # 16 characters, 32 bytes
    assert "é" not in repr(tokens)
    issued = tokens.issue("key1", [])
    assert issued.token not in repr(issued)


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.sig", True),
        ("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", True),
        ("ss_" + "A" * 43, False),
        ("a.b", False),
        ("a.b.c.d", False),
        ("has space.b.c", False),
        ("", False),
    ],
)
def test_looks_like_jwt(candidate: str, expected: bool) -> None:
    assert looks_like_jwt(candidate) is expected
