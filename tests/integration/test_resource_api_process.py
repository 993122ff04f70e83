"""The resource API as a real process on loopback, driven by ResourceClient over real HTTP."""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pydantic import SecretStr

from devservers.resource_api import (
    RecordingSession,
    ResourceApiServer,
    free_port,
    start_resource_api_server,
)
from lib.errors import AuthenticationError, PermissionDeniedError, UpstreamError
from lib.retry import RetryPolicy
from lib.sealed.fingerprint import node_fingerprint
from lib.sealed.format import generate_key, open_stream, seal_stream, split_point
from lib.sealed.keywrap import NodeKeyPair
from lib.sealed.resource_client import ResourceClient
from lib.sealed.wire import CdnConfig, ResourceManifest

TOKEN_TTL_S = 2
PUBLISHER = ("publisher@example.com", "integration-publisher-pw")
READER = ("reader@example.com", "integration-reader-pw")
PINNED = ("pinned@example.com", "integration-pinned-pw")
FP_A = node_fingerprint(machine_id_path=os.devnull, hostname="node-a", gpu_uuids=["GPU-a"])
FP_B = node_fingerprint(machine_id_path=os.devnull, hostname="node-b", gpu_uuids=["GPU-b"])
FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResourceApiServer]:
    server = start_resource_api_server(tmp_path_factory.mktemp("resource-api"), token_ttl_seconds=TOKEN_TTL_S)
    try:
        server.create_user(*PUBLISHER, role="publisher")
        server.create_user(*READER, role="reader")
        server.create_user(*PINNED, role="reader", fingerprints=[FP_A])
        yield server
    finally:
        server.stop()
    # Read after the process ended, so every line it wrote is there.
    log = server.log_tail(10**7)
    assert "released DEK" in log, "the server log must be the one this module exercised"
    for secret in (*[who[1] for who in (PUBLISHER, READER, PINNED)], server.env["RESOURCE_MASTER_KEY"],
                   server.env["RESOURCE_JWT_SECRET"], "s3-secret-for-the-process-test"):
        assert secret not in log


def _client(server: ResourceApiServer, who: tuple[str, str], session: requests.Session | None = None
            ) -> ResourceClient:
    return ResourceClient(server.url, who[0], who[1], timeout=(1.0, 10.0), retry=FAST_RETRY, session=session)


def _publish(server: ResourceApiServer, name: str, plaintext: bytes) -> tuple[bytes, bytes]:
    """Seal ``plaintext``, upload its small part; return (DEK, big part) as a publisher would."""
    dek = generate_key()
    sealed = io.BytesIO()
    seal_stream(io.BytesIO(plaintext), sealed, dek, segment_size=4096)
    blob = sealed.getvalue()
    cut = split_point(len(blob), 1)
    manifest = ResourceManifest(
        id=hashlib.sha256(plaintext).hexdigest(), name=name, kind="image-classification",
        plaintext_size=len(plaintext), sealed_size=len(blob), small_size=cut,
        big_key=f"models/{name}.big", segment_size=4096, is_directory=False,
    )
    result = _client(server, PUBLISHER).upload("models", name, blob[:cut], manifest, dek)
    assert result.status in ("created", "unchanged")
    return dek, blob[cut:]


def test_publish_fetch_and_open_through_the_real_server(server: ResourceApiServer) -> None:
    plaintext = os.urandom(20_000)
    dek, big = _publish(server, "round-trip", plaintext)
    publisher = _client(server, PUBLISHER)
    before = publisher.fetch_count(folder="models", name="round-trip", kind="dek")
    keypair = NodeKeyPair.generate()
    fetched = _client(server, READER).get("models", "round-trip", keypair, FP_A)
    assert fetched.dek == dek
    opened = io.BytesIO()
    open_stream(io.BytesIO(fetched.small_part + big), opened, fetched.dek)
    assert opened.getvalue() == plaintext
    assert publisher.fetch_count(folder="models", name="round-trip", kind="dek") == before + 1
    assert "round-trip" in [m.name for m in _client(server, READER).list("models")]


def test_cdn_config_set_by_cli_and_client(server: ResourceApiServer) -> None:
    config = CdnConfig(endpoint_url="http://127.0.0.1:9", bucket="sealed", access_key_id="AKID",
                       secret_access_key=SecretStr("s3-secret-for-the-process-test"))
    server.set_cdn(config)
    released = _client(server, READER).cdn_config(NodeKeyPair.generate(), FP_A)
    assert released.plaintext_json() == config.plaintext_json()
    _client(server, PUBLISHER).set_cdn_config(config.model_copy(update={"bucket": "sealed-2"}))
    assert _client(server, READER).cdn_config(NodeKeyPair.generate(), FP_B).bucket == "sealed-2"


def test_relogin_after_token_expiry_happens_on_401(server: ResourceApiServer) -> None:
    _publish(server, "expiry", os.urandom(5000))
    session = RecordingSession()
    client = _client(server, READER, session)
    keypair = NodeKeyPair.generate()
    client.get("models", "expiry", keypair, FP_A)
    assert session.calls == [("POST", "/login", 200), ("POST", "/resources/get/models", 200)]
    time.sleep(TOKEN_TTL_S + 1.1)  # exp = iat + TTL with iat floored to the second; no leeway
    session.calls.clear()
    assert client.get("models", "expiry", keypair, FP_A).manifest.name == "expiry"
    assert session.calls == [
        ("POST", "/resources/get/models", 401),
        ("POST", "/login", 200),
        ("POST", "/resources/get/models", 200),
    ]


def test_403_is_a_denial_and_not_retried(server: ResourceApiServer) -> None:
    _publish(server, "pinned", os.urandom(5000))
    publisher = _client(server, PUBLISHER)
    before = publisher.fetch_count(name="pinned")
    session = RecordingSession()
    pinned = _client(server, PINNED, session)
    with pytest.raises(PermissionDeniedError):
        pinned.get("models", "pinned", NodeKeyPair.generate(), FP_B)
    assert session.calls == [("POST", "/login", 200), ("POST", "/resources/get/models", 403)]
    assert publisher.fetch_count(name="pinned") == before, "a denied request releases nothing"
    assert pinned.get("models", "pinned", NodeKeyPair.generate(), FP_A).manifest.name == "pinned"
    assert publisher.fetch_count(name="pinned") == before + 1
    assert publisher.fetch_count(name="pinned", fingerprint=FP_B) == 0
    assert publisher.fetch_count(name="pinned", kind="dek", fingerprint=FP_A) >= 1


def test_wrong_password_is_one_login_and_an_authentication_error(server: ResourceApiServer) -> None:
    session = RecordingSession()
    client = ResourceClient(server.url, READER[0], "not-the-password", retry=FAST_RETRY, session=session)
    with pytest.raises(AuthenticationError) as info:
        client.list("models")
    assert session.calls == [("POST", "/login", 401)]
    assert "not-the-password" not in info.value.message


def test_server_down_is_an_upstream_error_after_bounded_retries(tmp_path: Path) -> None:
    server = start_resource_api_server(tmp_path / "doomed")
    try:
        server.create_user(*READER, role="reader")
        session = RecordingSession()
        client = _client(server, READER, session)
        assert client.list("models") == []
        os.kill(server.pid, 9)
        server.process.wait(timeout=10)
        session.calls.clear()
        started = time.monotonic()
        with pytest.raises(UpstreamError) as info:
            client.list("models")
        assert time.monotonic() - started < 5
        assert session.calls == [("GET", "/resources/models", "ConnectionError")] * FAST_RETRY.attempts
        assert "GET /resources/models" in info.value.message and READER[1] not in info.value.message
    finally:
        server.stop()


def test_nothing_listening_is_an_upstream_error(tmp_path: Path) -> None:
    session = RecordingSession()
    client = ResourceClient(f"http://127.0.0.1:{free_port()}", *READER, retry=FAST_RETRY, session=session)
    with pytest.raises(UpstreamError, match=r"GET /stats/fetches failed: .* unreachable after 3 attempts"):
        client.fetch_count()
    assert session.calls == [("POST", "/login", "ConnectionError")] * FAST_RETRY.attempts
