"""ResourceClient (lib/sealed/resource_client.py) against a small in-memory fake of the resource API.

The fake cuts the network boundary only: it issues tokens, checks them, wraps keys for real, and
can be told to fail a path with a status or an exception, so every retry, re-login and denial
decision of the client is observable as a list of calls.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from lib.errors import (
    AuthenticationError,
    ConfigurationError,
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    UpstreamError,
    ValidationFailedError,
)
from lib.retry import RetryPolicy
from lib.sealed.keywrap import NodeKeyPair, b64decode, b64encode, wrap_for_node
from lib.sealed.resource_client import ResourceClient
from lib.sealed.signing import SigningKey, node_request_message, verify
from lib.sealed.wire import CdnConfig, ResourceManifest

NODE_KEY = SigningKey.generate()

PASSWORD = "client-password-123"
FP = "c" * 64
DEK = os.urandom(32)
MANIFEST = ResourceManifest(id="d" * 64, name="model", kind="image-classification", plaintext_size=100,
                            sealed_size=200, small_size=4, big_key="m/model.big", segment_size=65536,
                            is_directory=False)


def _response(status: int, body: Any) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps(body).encode()
    response.headers["Content-Type"] = "application/json"
    return response


def _error(status: int, message: str) -> requests.Response:
    return _response(status, {"error": {"code": "x", "message": message, "request_id": "r"}})


@dataclass
class FakeResourceApi:
    """Duck-types the part of ``requests.Session`` the client uses."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    timeouts: list[Any] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=set)
    failures: dict[str, list[int | Exception]] = field(default_factory=dict)
    wrap_fingerprint: str | None = None
    logins: int = 0
    node_status: str = "approved"
    nonces: set[str] = field(default_factory=set)

    def request(self, method: str, url: str, *, json: Any = None, params: Any = None,
                headers: dict[str, str] | None = None, timeout: Any = None) -> requests.Response:
        path = urlsplit(url).path
        self.calls.append((method, path))
        self.timeouts.append(timeout)
        queue = self.failures.get(path)
        if queue:
            failure = queue.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return _error(failure, f"injected {failure}")
        if path == "/login":
            if json != {"email": "node@example.com", "password": PASSWORD}:
                return _error(401, "invalid email or password")
            self.logins += 1
            token = f"token-{self.logins}"
            self.valid_tokens.add(token)
            body = {"access_token": token, "token_type": "bearer", "expires_in": 60, "scope": "reader"}
            return _response(200, body)
        if (headers or {}).get("Authorization", "").removeprefix("Bearer ") not in self.valid_tokens:
            return _error(401, "the token is invalid or has expired")
        return self._route(method, path, json)

    def _signature_ok(self, body: Any, kind: str, folder: str | None, name: str | None) -> bool:
        if body["nonce"] not in self.nonces or body["node_id"] != NODE_KEY.id:
            return False
        self.nonces.discard(body["nonce"])
        message = node_request_message(kind=kind, folder=folder, name=name,
                                       public_key=b64decode(body["public_key"]),
                                       fingerprint=body["fingerprint"],
                                       nonce=body["nonce"], node_id=body["node_id"])
        return verify(NODE_KEY.public_bytes, b64decode(body["signature"]), message)

    def _route(self, method: str, path: str, body: Any) -> requests.Response:
        if (method, path) == ("POST", "/nodes/enroll"):
            assert body["node_key"] == NODE_KEY.public_b64
            return _response(200, {"node_id": NODE_KEY.id, "fingerprint": body["fingerprint"],
                                   "hostname": body["hostname"], "status": self.node_status})
        if (method, path) == ("POST", "/nodes/nonce"):
            nonce = f"nonce-{len(self.calls):04d}-" + "n" * 32
            self.nonces.add(nonce)
            return _response(200, {"nonce": nonce, "expires_in": 60})
        if method == "POST" and path in ("/resources/get/models", "/cdn"):
            kind, folder = ("dek", "models") if path != "/cdn" else ("cdn", None)
            if not self._signature_ok(body, kind, folder, body.get("name")):
                return _error(403, "this node may not receive keys")
        if (method, path) == ("GET", "/stats/fetches"):
            return _response(200, {"count": 7})
        if (method, path) == ("GET", "/resources/models"):
            return _response(200, {"folder": "models", "resources": [MANIFEST.model_dump(mode="json")]})
        if (method, path) == ("POST", "/resources/get/models"):
            if body["name"] != "model":
                return _error(404, "no resource 'other' in folder 'models'")
            wrapped = wrap_for_node(DEK, b64decode(body["public_key"]),
                                    self.wrap_fingerprint or body["fingerprint"], context="dek")
            return _response(200, {"manifest": MANIFEST.model_dump(mode="json"),
                                   "small_part": b64encode(b"abcd"), "wrapped_key": wrapped.model_dump()})
        if (method, path) == ("POST", "/cdn"):
            config = CdnConfig(bucket="b", access_key_id="AK", secret_access_key="SK")  # type: ignore[arg-type]
            wrapped = wrap_for_node(
                config.plaintext_json(), b64decode(body["public_key"]), body["fingerprint"], context="cdn"
            )
            return _response(200, {"wrapped_config": wrapped.model_dump()})
        return _error(404, "Not Found")

    def close(self) -> None:
        pass


@pytest.fixture
def api() -> FakeResourceApi:
    return FakeResourceApi()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(api: FakeResourceApi, sleeps: list[float]) -> ResourceClient:
    return ResourceClient("http://127.0.0.1:8100", "node@example.com", PASSWORD, timeout=(1.0, 2.0),
                          retry=RetryPolicy(attempts=3, base_delay=0.5, max_delay=1.0),
                          session=api, sleep=sleeps.append, node_key=NODE_KEY)  # type: ignore[arg-type]


def test_logs_in_on_first_use_and_reuses_the_token(client: ResourceClient, api: FakeResourceApi) -> None:
    assert client.fetch_count() == 7 and client.fetch_count(folder="models") == 7
    assert api.calls == [("POST", "/login"), ("GET", "/stats/fetches"), ("GET", "/stats/fetches")]
    assert set(api.timeouts) == {(1.0, 2.0)}


def test_401_triggers_exactly_one_relogin(client: ResourceClient, api: FakeResourceApi) -> None:
    client.fetch_count()
    api.valid_tokens.clear()  # the token expired
    assert client.fetch_count() == 7
    assert api.calls[2:] == [("GET", "/stats/fetches"), ("POST", "/login"), ("GET", "/stats/fetches")]


def test_a_persistent_401_is_an_authentication_error_not_a_loop(
    client: ResourceClient, api: FakeResourceApi, sleeps: list[float]
) -> None:
    api.failures["/stats/fetches"] = [401, 401, 401, 401]
    with pytest.raises(AuthenticationError):
        client.fetch_count()
    assert api.calls == [("POST", "/login"), ("GET", "/stats/fetches"), ("POST", "/login"),
                         ("GET", "/stats/fetches")]
    assert sleeps == []


def test_403_is_a_denial_never_retried_nor_relogged(
    client: ResourceClient, api: FakeResourceApi, sleeps: list[float]
) -> None:
    api.failures["/stats/fetches"] = [403]
    with pytest.raises(PermissionDeniedError, match="injected 403"):
        client.fetch_count()
    assert api.calls == [("POST", "/login"), ("GET", "/stats/fetches")]
    assert sleeps == []


def test_5xx_is_retried_with_bounded_backoff(
    client: ResourceClient, api: FakeResourceApi, sleeps: list[float]
) -> None:
    api.failures["/stats/fetches"] = [503, 502]
    assert client.fetch_count() == 7
    assert api.calls.count(("GET", "/stats/fetches")) == 3
    assert len(sleeps) == 2 and all(0 <= s <= 1.0 for s in sleeps)


@pytest.mark.parametrize(
    "failure", [requests.ConnectionError("refused"), requests.ReadTimeout("slow"), 500]
)
def test_gives_up_with_upstream_error_naming_the_path(
    client: ResourceClient, api: FakeResourceApi, sleeps: list[float], failure: int | Exception
) -> None:
    api.failures["/resources/models"] = [failure] * 10
    with pytest.raises(UpstreamError) as info:
        client.list("models")
    assert api.calls.count(("GET", "/resources/models")) == 3, "bounded by RetryPolicy.attempts"
    assert len(sleeps) == 2
    assert "GET /resources/models" in info.value.message and "127.0.0.1:8100" in info.value.message
    assert PASSWORD not in info.value.message and "token-" not in info.value.message


def test_login_connection_errors_are_retried_but_wrong_passwords_are_not(
    api: FakeResourceApi, sleeps: list[float]
) -> None:
    api.failures["/login"] = [requests.ConnectionError("down")]
    good = ResourceClient("http://127.0.0.1:1", "node@example.com", PASSWORD, session=api,  # type: ignore[arg-type]
                          retry=RetryPolicy(attempts=3, base_delay=0.01), sleep=sleeps.append)
    assert good.fetch_count() == 7
    api.calls.clear()
    bad = ResourceClient("http://127.0.0.1:1", "node@example.com", "wrong-password-00", session=api,  # type: ignore[arg-type]
                         retry=RetryPolicy(attempts=3, base_delay=0.01), sleep=sleeps.append)
    with pytest.raises(AuthenticationError) as info:
        bad.fetch_count()
    assert api.calls == [("POST", "/login")]
    assert "wrong-password-00" not in info.value.message and "wrong-password-00" not in repr(bad)


def test_get_unwraps_the_dek(client: ResourceClient, api: FakeResourceApi) -> None:
    keypair = NodeKeyPair.generate()
    fetched = client.get("models", "model", keypair, FP)
    assert fetched.dek == DEK and fetched.small_part == b"abcd" and fetched.manifest == MANIFEST
    assert DEK.hex() not in repr(fetched) and "abcd" not in repr(fetched)
    # Enrolled once; every release asks for its own nonce and signs with it.
    client.get("models", "model", keypair, FP)
    assert [call for call in api.calls if call[1] != "/login"] == [
        ("POST", "/nodes/enroll"), ("POST", "/nodes/nonce"), ("POST", "/resources/get/models"),
        ("POST", "/nodes/nonce"), ("POST", "/resources/get/models"),
    ]


def test_a_node_not_yet_approved_is_told_the_command_and_asks_for_nothing(
    client: ResourceClient, api: FakeResourceApi
) -> None:
    api.node_status = "pending"
    with pytest.raises(PermissionDeniedError, match=f"resource-api nodes approve {NODE_KEY.id}"):
        client.get("models", "model", NodeKeyPair.generate(), FP)
    assert ("POST", "/resources/get/models") not in api.calls
    api.node_status = "approved"  # approved meanwhile: the next release goes through
    assert client.get("models", "model", NodeKeyPair.generate(), FP).dek == DEK


def test_a_revoked_node_is_told_so(api: FakeResourceApi, client: ResourceClient) -> None:
    api.node_status = "revoked"
    with pytest.raises(PermissionDeniedError, match="is revoked: it receives no keys"):
        client.cdn_config(NodeKeyPair.generate(), FP)
    assert ("POST", "/cdn") not in api.calls


def test_a_release_needs_the_node_key_and_plain_http_needs_an_opt_in(api: FakeResourceApi) -> None:
    keyless = ResourceClient("http://127.0.0.1:1", "node@example.com", PASSWORD, session=api)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="node's key"):
        keyless.get("models", "model", NodeKeyPair.generate(), FP)
    with pytest.raises(ConfigurationError, match="plain HTTP"):
        ResourceClient("http://resource-api.example.com", "node@example.com", PASSWORD)
    ResourceClient("http://resource-api.example.com", "node@example.com", PASSWORD, allow_plain_http=True)
    ResourceClient("https://resource-api.example.com", "node@example.com", PASSWORD)


def test_a_key_wrapped_for_another_node_is_an_integrity_error(
    client: ResourceClient, api: FakeResourceApi
) -> None:
    api.wrap_fingerprint = "e" * 64
    with pytest.raises(IntegrityError):
        client.get("models", "model", NodeKeyPair.generate(), FP)


def test_not_found_keeps_the_server_message(client: ResourceClient) -> None:
    with pytest.raises(NotFoundError, match="no resource 'other'"):
        client.get("models", "other", NodeKeyPair.generate(), FP)


def test_cdn_config_is_unwrapped_into_a_secret(client: ResourceClient) -> None:
    config = client.cdn_config(NodeKeyPair.generate(), FP)
    assert config.bucket == "b" and config.secret_access_key.get_secret_value() == "SK"
    assert "SK" not in repr(config)


def test_bad_input_is_refused_before_any_request(client: ResourceClient, api: FakeResourceApi) -> None:
    with pytest.raises(ValidationFailedError, match="dek"):
        client.upload("models", "model", b"abcd", MANIFEST, b"short")
    with pytest.raises(ValidationFailedError, match="fingerprint"):
        client.get("models", "model", NodeKeyPair.generate(), "not-a-fingerprint")
    assert api.calls == []


def test_credentials_in_the_url_never_reach_messages(api: FakeResourceApi) -> None:
    api.failures["/login"] = [requests.ConnectionError("x")] * 5
    client = ResourceClient("http://user:hunter2@127.0.0.1:9/", "node@example.com", PASSWORD,  # type: ignore[arg-type]
                            session=api, retry=RetryPolicy(attempts=2, base_delay=0.0), sleep=lambda _: None)
    with pytest.raises(UpstreamError) as info:
        client.fetch_count()
    assert "hunter2" not in info.value.message and "hunter2" not in repr(client)
    with pytest.raises(ValueError):
        ResourceClient("ftp://host", "node@example.com", PASSWORD)
