"""The resource API app (lib/resource_api) through FastAPI's TestClient, against a SQLite file."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib.errors import ConfigurationError, IntegrityError
from lib.resource_api.app import create_app
from lib.resource_api.passwords import PasswordHasher
from lib.resource_api.service import create_user
from lib.resource_api.settings import ResourceApiSettings
from lib.sealed.keywrap import NodeKeyPair, WrappedSecret, b64encode
from lib.sealed.signing import SigningKey, node_request_message
from lib.tokens import TokenService

MASTER_KEY = os.urandom(32).hex()
JWT_SECRET = secrets.token_urlsafe(48)
PUBLISHER = ("publisher@example.com", "publisher-password-1")
READER = ("reader@example.com", "reader-password-123")
PINNED = ("pinned@example.com", "pinned-password-123")
FP_A = hashlib.sha256(b"node-a").hexdigest()
FP_B = hashlib.sha256(b"node-b").hexdigest()
MAX_UPLOAD = 16 * 1024
# One approved node key per fingerprint (the app fixture enrolls and approves them).
NODE_KEYS = {FP_A: SigningKey.generate(), FP_B: SigningKey.generate()}


def _settings(tmp_path: Path, **overrides: Any) -> ResourceApiSettings:
    values: dict[str, Any] = {
        "environment": "production",
        "database_url": f"sqlite:///{tmp_path / 'resource-api.db'}",
        "master_key": MASTER_KEY,
        "jwt_secret": JWT_SECRET,
        "max_upload_bytes": MAX_UPLOAD,
        "token_ttl_seconds": 60,
    }
    values.update(overrides)
    return ResourceApiSettings(**values)


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    app = create_app(_settings(tmp_path))
    store = app.state.service.store
    create_user(store, email=PUBLISHER[0], password=PUBLISHER[1], role="publisher")
    create_user(store, email=READER[0], password=READER[1], role="reader")
    create_user(store, email=PINNED[0], password=PINNED[1], role="reader", fingerprints=[FP_A])
    nodes = app.state.service.nodes
    for fingerprint, key in NODE_KEYS.items():
        nodes.enroll(public_key=key.public_bytes, fingerprint=fingerprint, hostname="test", user_id=1)
        nodes.set_status(key.id, "approved")
    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def _headers(client: TestClient, who: tuple[str, str]) -> dict[str, str]:
    response = client.post("/login", json={"email": who[0], "password": who[1]})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def _manifest(name: str = "model", small_size: int = 10, model_id: str = "a" * 64) -> dict[str, Any]:
    return {
        "id": model_id, "name": name, "kind": "text-to-image", "plaintext_size": 1000,
        "sealed_size": max(1100, 5 * small_size), "small_size": small_size, "big_key": f"models/{name}.big",
        "segment_size": 1 << 20, "is_directory": False,
    }


def _upload(client: TestClient, headers: dict[str, str], *, name: str = "model", small: bytes = b"0123456789",
            dek: bytes | None = None, model_id: str = "a" * 64, folder: str = "models") -> Any:
    body = {"name": name, "small_part": b64encode(small), "dek": b64encode(dek or os.urandom(32)),
            "manifest": _manifest(name, len(small), model_id)}
    return client.post(f"/resources/{folder}", json=body, headers=headers)


def _signed(client: TestClient, headers: dict[str, str], keypair: NodeKeyPair, fingerprint: str, *,
            kind: str, folder: str | None = None, name: str | None = None,
            node_key: SigningKey | None = None) -> dict[str, Any]:
    """A release body as an approved node sends it: a fresh nonce, signed by the node key."""
    key = node_key or NODE_KEYS[fingerprint]
    nonce = client.post("/nodes/nonce", headers=headers).json()["nonce"]
    message = node_request_message(kind=kind, folder=folder, name=name, public_key=keypair.public_bytes(),
                                   fingerprint=fingerprint, nonce=nonce, node_id=key.id)
    return {"public_key": keypair.public_key_b64(), "fingerprint": fingerprint, "node_id": key.id,
            "nonce": nonce, "signature": b64encode(key.sign(message))}


def _get(client: TestClient, headers: dict[str, str], keypair: NodeKeyPair, fingerprint: str = FP_A,
         name: str = "model", folder: str = "models") -> Any:
    signed = _signed(client, headers, keypair, fingerprint, kind="dek", folder=folder, name=name)
    body = {"name": name, **signed}
    return client.post(f"/resources/get/{folder}", json=body, headers=headers)


def _put_cdn(client: TestClient, headers: dict[str, str], s3_key: str = "s3-key") -> Any:
    config = {"bucket": "b", "access_key_id": "a", "secret_access_key": s3_key}
    return client.put("/cdn", json=config, headers=headers)


def _post_cdn(client: TestClient, headers: dict[str, str], keypair: NodeKeyPair, fingerprint: str) -> Any:
    body = _signed(client, headers, keypair, fingerprint, kind="cdn")
    return client.post("/cdn", json=body, headers=headers)


def _assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert set(error) == {"code", "message", "request_id"}
    return dict(error)


# -- login and tokens -----------------------------------------------------------------------------


def test_login_issues_a_pinned_short_lived_jwt(client: TestClient) -> None:
    response = client.post("/login", json={"email": PUBLISHER[0], "password": PUBLISHER[1]})
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 60
    token = body["access_token"]
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience="sealserve-resource-api")
    assert claims["scopes"] == ["publisher"] and claims["iss"] == "sealserve-resource-api"
    assert claims["exp"] - claims["iat"] == 60 and claims["sub"]


def test_wrong_password_and_unknown_user_look_the_same(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    original = PasswordHasher.verify

    def counting_verify(self: PasswordHasher, password: str, stored: str) -> bool:
        calls.append(password)
        return original(self, password, stored)

    monkeypatch.setattr(PasswordHasher, "verify", counting_verify)
    wrong = _assert_error(client.post("/login", json={"email": PUBLISHER[0], "password": "nope-nope"}),
                          401, "unauthorized")
    unknown = _assert_error(client.post("/login", json={"email": "ghost@example.com", "password": "x"}),
                            401, "unauthorized")
    assert wrong["message"] == unknown["message"]
    assert calls == ["nope-nope", "x"], "scrypt must run for unknown users too"
    upper = client.post("/login", json={"email": PUBLISHER[0].upper(), "password": PUBLISHER[1]})
    assert upper.status_code == 200, "emails are case-insensitive"


@pytest.mark.parametrize(
    "authorization",
    [None, "Basic abc", "Bearer", "Bearer not-a-jwt",
     "Bearer " + jwt.encode({"sub": "1"}, "x" * 40, algorithm="HS256"),
     "Bearer " + jwt.encode({"sub": "1", "role": "publisher"}, None, algorithm="none")],
)
def test_requests_without_a_valid_token_are_401(client: TestClient, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = client.get("/resources/models", headers=headers)
    _assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("change", "status"),
    [({}, 200), ({"audience": "other"}, 401), ({"issuer": "other"}, 401), ({"secret": "y" * 40}, 401),
     ({"clock": lambda: 1000.0}, 401)],
)
def test_only_tokens_with_our_claims_and_secret_pass(
    client: TestClient, change: dict[str, Any], status: int
) -> None:
    params: dict[str, Any] = {"secret": JWT_SECRET, "issuer": "sealserve-resource-api",
                              "audience": "sealserve-resource-api", "ttl_s": 60}
    token = TokenService(**{**params, **change}).issue("1", ["publisher"]).token
    response = client.get("/resources/models", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == status, response.text


# -- roles, upload, get, list ------------------------------------------------------------------------


def test_reader_cannot_publish_or_read_stats(client: TestClient) -> None:
    reader = _headers(client, READER)
    _assert_error(_upload(client, reader), 403, "forbidden")
    _assert_error(_put_cdn(client, reader), 403, "forbidden")
    _assert_error(client.get("/stats/fetches", headers=reader), 403, "forbidden")


def test_upload_get_list_round_trip(client: TestClient) -> None:
    publisher, reader = _headers(client, PUBLISHER), _headers(client, READER)
    dek = os.urandom(32)
    assert _upload(client, publisher, dek=dek).json()["status"] == "created"
    keypair = NodeKeyPair.generate()
    response = _get(client, reader, keypair)
    assert response.status_code == 200, response.text
    body = response.json()
    assert base64.b64decode(body["small_part"]) == b"0123456789"
    assert body["manifest"] == _manifest()
    assert keypair.unwrap(WrappedSecret.model_validate(body["wrapped_key"]), FP_A, context="dek") == dek
    listing = client.get("/resources/models", headers=reader).json()
    assert listing == {"folder": "models", "resources": [_manifest()]}
    assert client.get("/resources/empty", headers=reader).json()["resources"] == []
    _assert_error(_get(client, reader, keypair, name="absent"), 404, "not_found")


def test_reupload_is_idempotent_and_a_new_id_or_sealing_replaces(client: TestClient) -> None:
    publisher, reader = _headers(client, PUBLISHER), _headers(client, READER)
    dek = os.urandom(32)
    assert _upload(client, publisher, dek=dek).json()["status"] == "created"
    assert _upload(client, publisher, dek=dek).json()["status"] == "unchanged"
    new_dek = os.urandom(32)
    assert _upload(client, publisher, dek=new_dek).json()["status"] == "replaced"
    assert _upload(client, publisher, dek=new_dek, model_id="b" * 64).json()["status"] == "replaced"
    keypair = NodeKeyPair.generate()
    body = _get(client, reader, keypair).json()
    assert body["manifest"]["id"] == "b" * 64
    assert keypair.unwrap(WrappedSecret.model_validate(body["wrapped_key"]), FP_A, context="dek") == new_dek


def test_dek_is_encrypted_at_rest(client: TestClient, app: FastAPI, tmp_path: Path) -> None:
    dek = os.urandom(32)
    _upload(client, _headers(client, PUBLISHER), dek=dek)
    with sqlite3.connect(tmp_path / "resource-api.db") as db:
        (stored,) = db.execute("SELECT dek_encrypted FROM resource_api_resources").fetchone()
    assert stored != dek and dek not in stored and dek.hex().encode() not in stored
    assert b64encode(dek).encode() not in stored
    assert len(stored) == 1 + 12 + 32 + 16


def test_a_different_master_key_cannot_release_stored_keys(client: TestClient, tmp_path: Path) -> None:
    _upload(client, _headers(client, PUBLISHER))
    other = create_app(_settings(tmp_path, master_key=os.urandom(32).hex()))
    with TestClient(other) as other_client:
        response = _get(other_client, _headers(other_client, READER), NodeKeyPair.generate())
    _assert_error(response, 503, "integrity_error")


def test_wrapped_key_opens_only_for_its_keypair_and_fingerprint(client: TestClient) -> None:
    _upload(client, _headers(client, PUBLISHER))
    keypair = NodeKeyPair.generate()
    response = _get(client, _headers(client, READER), keypair)
    wrapped = WrappedSecret.model_validate(response.json()["wrapped_key"])
    with pytest.raises(IntegrityError):
        NodeKeyPair.generate().unwrap(wrapped, FP_A, context="dek")
    with pytest.raises(IntegrityError):
        keypair.unwrap(wrapped, FP_B, context="dek")
    with pytest.raises(IntegrityError):
        keypair.unwrap(wrapped, FP_A, context="cdn")


def test_fingerprint_allow_list(client: TestClient) -> None:
    publisher, pinned = _headers(client, PUBLISHER), _headers(client, PINNED)
    _upload(client, publisher)
    _put_cdn(client, publisher)
    keypair = NodeKeyPair.generate()
    assert _get(client, pinned, keypair, fingerprint=FP_A).status_code == 200
    _assert_error(_get(client, pinned, keypair, fingerprint=FP_B), 403, "forbidden")
    cdn_b = _post_cdn(client, pinned, keypair, FP_B)
    _assert_error(cdn_b, 403, "forbidden")
    assert client.get("/stats/fetches", headers=publisher).json()["count"] == 1, "denials release nothing"


def test_fetches_are_logged_and_countable(client: TestClient) -> None:
    publisher, reader = _headers(client, PUBLISHER), _headers(client, READER)
    _upload(client, publisher, name="one")
    _upload(client, publisher, name="two")
    _put_cdn(client, publisher)
    keypair = NodeKeyPair.generate()
    for _ in range(3):
        assert _get(client, reader, keypair, name="one").status_code == 200
    assert _get(client, reader, keypair, name="two", fingerprint=FP_B).status_code == 200
    cdn = _post_cdn(client, reader, keypair, FP_A)
    assert cdn.status_code == 200

    def count(**params: str) -> int:
        response = client.get("/stats/fetches", params=params, headers=publisher)
        assert response.status_code == 200, response.text
        return int(response.json()["count"])

    assert count() == 5
    assert count(kind="dek") == 4 and count(kind="cdn") == 1
    assert count(folder="models", name="one") == 3 and count(name="two", kind="dek") == 1
    assert count(folder="elsewhere") == 0
    assert count(fingerprint=FP_B) == 1 and count(fingerprint=FP_A, kind="cdn") == 1


def test_cdn_config_round_trip_and_encrypted_at_rest(client: TestClient, tmp_path: Path) -> None:
    publisher, reader = _headers(client, PUBLISHER), _headers(client, READER)
    keypair = NodeKeyPair.generate()
    _assert_error(_post_cdn(client, reader, keypair, FP_A), 404, "not_found")
    secret = "cdn-secret-" + secrets.token_hex(8)
    config = {"endpoint_url": "http://127.0.0.1:9000", "bucket": "models", "region": "eu-west-1",
              "access_key_id": "AKIDEXAMPLE", "secret_access_key": secret}
    assert client.put("/cdn", json=config, headers=publisher).status_code == 200
    response = _post_cdn(client, reader, keypair, FP_A)
    wrapped = WrappedSecret.model_validate(response.json()["wrapped_config"])
    from lib.sealed.wire import CdnConfig

    released = CdnConfig.from_plaintext_json(keypair.unwrap(wrapped, FP_A, context="cdn"))
    assert released.secret_access_key.get_secret_value() == secret and released.bucket == "models"
    with pytest.raises(IntegrityError):
        keypair.unwrap(wrapped, FP_A, context="dek")
    with sqlite3.connect(tmp_path / "resource-api.db") as db:
        (stored,) = db.execute("SELECT config_encrypted FROM resource_api_cdn_config").fetchone()
    assert secret.encode() not in stored and b"AKIDEXAMPLE" not in stored


# -- limits and validation ------------------------------------------------------------------------


def test_body_over_the_limit_is_413(client: TestClient) -> None:
    publisher = _headers(client, PUBLISHER)
    _assert_error(_upload(client, publisher, small=os.urandom(MAX_UPLOAD)), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_UPLOAD // 1024 + 2):
            yield b" " * 1024

    # A chunked body declares no length: the limit must hold while reading too.
    chunked = client.post("/resources/models", content=chunks(),
                          headers={**publisher, "Content-Type": "application/json"})
    _assert_error(chunked, 413, "payload_too_large")
    assert _upload(client, publisher, small=os.urandom(MAX_UPLOAD // 2)).status_code == 200


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"dek": b64encode(os.urandom(16))}, "dek"),
        ({"dek": "%%%"}, "dek"),
        ({"manifest": {**_manifest(), "id": "not-a-sha"}}, "manifest.id"),
        ({"manifest": {k: v for k, v in _manifest().items() if k != "big_key"}}, "manifest.big_key"),
        ({"manifest": _manifest(small_size=3)}, "small_size"),
        ({"manifest": _manifest(name="other")}, "manifest.name"),
        ({"unexpected": 1}, "unexpected"),
        ({"name": "../etc"}, "name"),
    ],
)
def test_invalid_uploads_are_422_in_the_error_shape(
    client: TestClient, change: dict[str, Any], where: str
) -> None:
    body = {"name": "model", "small_part": b64encode(b"0123456789"), "dek": b64encode(os.urandom(32)),
            "manifest": _manifest()}
    response = client.post("/resources/models", json={**body, **change}, headers=_headers(client, PUBLISHER))
    error = _assert_error(response, 422, "validation_error")
    assert where in error["message"]


def test_invalid_key_requests_are_422(client: TestClient) -> None:
    reader = _headers(client, READER)
    bad_key = {"name": "model", "public_key": b64encode(b"short"), "fingerprint": FP_A}
    _assert_error(client.post("/resources/get/models", json=bad_key, headers=reader), 422, "validation_error")
    bad_fp = {"name": "model", "public_key": NodeKeyPair.generate().public_key_b64(), "fingerprint": "A|B"}
    _assert_error(client.post("/resources/get/models", json=bad_fp, headers=reader), 422, "validation_error")
    _assert_error(client.get("/resources/bad%24folder", headers=reader), 422, "validation_error")
    _assert_error(client.get("/stats/fetches?kind=other", headers=_headers(client, PUBLISHER)),
                  422, "validation_error")


def test_other_errors_keep_the_shape(client: TestClient) -> None:
    _assert_error(client.get("/no/such/route"), 404, "not_found")
    _assert_error(client.post("/login", content=b"email=x", headers={"Content-Type": "text/plain"}),
                  415, "unsupported_media_type")
    _assert_error(client.post("/login", content=b"{", headers={"Content-Type": "application/json"}),
                  400, "bad_request")
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/health", headers={"X-Request-ID": "trace-42"}).headers["X-Request-ID"] == "trace-42"


def test_validation_errors_do_not_echo_secrets(client: TestClient) -> None:
    password = "pw-" + secrets.token_hex(600)  # over the 1024-character limit
    response = client.post("/login", json={"email": READER[0], "password": password})
    _assert_error(response, 422, "validation_error")
    assert password not in response.text and password[:40] not in response.text


# -- settings ---------------------------------------------------------------------------------------


def _env(**values: str) -> dict[str, str]:
    return {"RESOURCE_MASTER_KEY": MASTER_KEY, "RESOURCE_JWT_SECRET": JWT_SECRET, **values}


@pytest.mark.parametrize(
    "env",
    [
        {"RESOURCE_JWT_SECRET": JWT_SECRET},
        {"RESOURCE_MASTER_KEY": MASTER_KEY},
        _env(RESOURCE_MASTER_KEY="00" * 32),
        _env(RESOURCE_MASTER_KEY="changeme"),
        _env(RESOURCE_MASTER_KEY=MASTER_KEY[:40]),
        _env(RESOURCE_JWT_SECRET="short"),
        _env(RESOURCE_JWT_SECRET="a" * 40),
    ],
)
def test_missing_or_placeholder_secrets_refuse_to_start_outside_development(
    env: dict[str, str], tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError) as info:
        ResourceApiSettings.from_env({**env, "RESOURCE_API_ENV": "production"}, state_dir=str(tmp_path))
    for value in env.values():
        assert value not in info.value.message
    assert not list(tmp_path.iterdir()), "production must not generate secrets"


def test_secrets_from_env_in_hex_or_base64(tmp_path: Path) -> None:
    raw = os.urandom(32)
    urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    for text in (raw.hex(), base64.b64encode(raw).decode(), urlsafe):
        settings = ResourceApiSettings.from_env(_env(RESOURCE_MASTER_KEY=text), environment="production")
        assert settings.master_key_bytes() == raw
        assert text not in repr(settings) and JWT_SECRET not in repr(settings)


def test_development_generates_and_keeps_secrets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = ResourceApiSettings.from_env({}, environment="development", state_dir=str(tmp_path))
    second = ResourceApiSettings.from_env({}, environment="development", state_dir=str(tmp_path))
    assert first.master_key_bytes() == second.master_key_bytes()
    assert first.jwt_secret_bytes() == second.jwt_secret_bytes()
    for path in tmp_path.iterdir():
        assert path.stat().st_mode & 0o077 == 0
    assert "not set" in caplog.text


def test_create_app_with_env_settings_refuses_without_master_key(tmp_path: Path) -> None:
    from lib.resource_api.app import app_from_env

    os_env = {"RESOURCE_JWT_SECRET": JWT_SECRET, "RESOURCE_API_ENV": "production",
              "RESOURCE_API_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    with pytest.MonkeyPatch.context() as patch:
        for name in ("RESOURCE_MASTER_KEY", "RESOURCE_API_ENV"):
            patch.delenv(name, raising=False)
        for name, value in os_env.items():
            patch.setenv(name, value)
        with pytest.raises(ConfigurationError, match="RESOURCE_MASTER_KEY"):
            app_from_env()
    assert not (tmp_path / "x.db").exists(), "nothing may be created before the settings are valid"


# -- logs -------------------------------------------------------------------------------------------


def test_no_secret_reaches_a_log_line(app: FastAPI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    dek = os.urandom(32)
    cdn_secret = "cdn-" + secrets.token_hex(12)
    wrong_password = "wrong-" + secrets.token_hex(8)
    with TestClient(app) as client:
        client.post("/login", json={"email": READER[0], "password": wrong_password})
        client.post("/login", json={"email": "nobody@example.com", "password": wrong_password})
        publisher_response = client.post("/login", json={"email": PUBLISHER[0], "password": PUBLISHER[1]})
        token = publisher_response.json()["access_token"]
        publisher = {"Authorization": f"Bearer {token}"}
        _upload(client, publisher, dek=dek)
        _put_cdn(client, publisher, cdn_secret)
        keypair = NodeKeyPair.generate()
        got = _get(client, publisher, keypair)
        _post_cdn(client, publisher, keypair, FP_A)
        client.get("/resources/models", headers={"Authorization": "Bearer " + token[:-4] + "AAAA"})
        _upload(client, publisher, small=os.urandom(MAX_UPLOAD), dek=dek)
    assert got.status_code == 200
    logged = caplog.text
    assert "login failed" in logged and "released DEK" in logged, "the test must see the app's log lines"
    forbidden = [PUBLISHER[1], READER[1], wrong_password, token, token.split(".")[2], dek.hex(),
                 b64encode(dek), cdn_secret, MASTER_KEY, JWT_SECRET, got.json()["wrapped_key"]["ciphertext"]]
    for secret in forbidden:
        assert secret not in logged
