"""The resource API as a real process on loopback, driven by ResourceClient over real HTTP.

Besides the round trips, the attacks of docs/security-sealed.md are run against the process: a
stolen reader password with the thief's own node key, an unsigned release, a replayed one, a
claimed fingerprint, an all-zero X25519 key, and 20 failed logins.
"""

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
from lib.sealed.keywrap import NodeKeyPair, b64encode
from lib.sealed.resource_client import ResourceClient
from lib.sealed.signing import SigningKey, node_request_message
from lib.sealed.wire import CdnConfig, ResourceManifest

TOKEN_TTL_S = 2
PUBLISHER = ("publisher@example.com", "integration-publisher-pw")
READER = ("reader@example.com", "integration-reader-pw")
PINNED = ("pinned@example.com", "integration-pinned-pw")
FP_A = node_fingerprint(machine_id_path=os.devnull, hostname="node-a", gpu_uuids=["GPU-a"])
FP_B = node_fingerprint(machine_id_path=os.devnull, hostname="node-b", gpu_uuids=["GPU-b"])
FP_C = node_fingerprint(machine_id_path=os.devnull, hostname="node-c", gpu_uuids=["GPU-c"])
FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2)
# The approved node keys of FP_A and FP_B (FP_C is nobody's).
NODE_KEYS = {FP_A: SigningKey.generate(), FP_B: SigningKey.generate()}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResourceApiServer]:
    server = start_resource_api_server(tmp_path_factory.mktemp("resource-api"), token_ttl_seconds=TOKEN_TTL_S)
    try:
        server.create_user(*PUBLISHER, role="publisher")
        server.create_user(*READER, role="reader")
        server.create_user(*PINNED, role="reader", fingerprints=[FP_A])
        for fingerprint, key in NODE_KEYS.items():
            server.approve_node(READER, key, fingerprint)
        yield server
    finally:
        server.stop()
    # Read after the process ended, so every line it wrote is there.
    log = server.log_tail(10**7)
    assert "released DEK" in log, "the server log must be the one this module exercised"
    for secret in (*[who[1] for who in (PUBLISHER, READER, PINNED)], server.env["RESOURCE_MASTER_KEY"],
                   server.env["RESOURCE_JWT_SECRET"], "s3-secret-for-the-process-test"):
        assert secret not in log


def _client(server: ResourceApiServer, who: tuple[str, str], session: requests.Session | None = None,
            node: str = FP_A) -> ResourceClient:
    """A client as the approved node ``node`` (a fingerprint of NODE_KEYS) would hold it."""
    return ResourceClient(server.url, who[0], who[1], timeout=(1.0, 10.0), retry=FAST_RETRY, session=session,
                          node_key=NODE_KEYS.get(node))


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
    assert _client(server, READER, node=FP_B).cdn_config(NodeKeyPair.generate(), FP_B).bucket == "sealed-2"


def test_relogin_after_token_expiry_happens_on_401(server: ResourceApiServer) -> None:
    _publish(server, "expiry", os.urandom(5000))
    session = RecordingSession()
    client = _client(server, READER, session)
    keypair = NodeKeyPair.generate()
    client.get("models", "expiry", keypair, FP_A)
    assert session.calls == [("POST", "/login", 200), ("POST", "/nodes/enroll", 200),
                             ("POST", "/nodes/nonce", 200), ("POST", "/resources/get/models", 200)]
    time.sleep(TOKEN_TTL_S + 1.1)  # exp = iat + TTL with iat floored to the second; no leeway
    session.calls.clear()
    assert client.get("models", "expiry", keypair, FP_A).manifest.name == "expiry"
    assert session.calls == [
        ("POST", "/nodes/nonce", 401),
        ("POST", "/login", 200),
        ("POST", "/nodes/nonce", 200),
        ("POST", "/resources/get/models", 200),
    ]


def test_403_is_a_denial_and_not_retried(server: ResourceApiServer) -> None:
    _publish(server, "pinned", os.urandom(5000))
    publisher = _client(server, PUBLISHER)
    before = publisher.fetch_count(name="pinned")
    session = RecordingSession()
    pinned = _client(server, PINNED, session, node=FP_B)
    with pytest.raises(PermissionDeniedError):
        pinned.get("models", "pinned", NodeKeyPair.generate(), FP_B)
    assert session.calls == [("POST", "/login", 200), ("POST", "/nodes/enroll", 403)]
    assert publisher.fetch_count(name="pinned") == before, "a denied request releases nothing"
    pinned = _client(server, PINNED, node=FP_A)
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


# -- attacks --------------------------------------------------------------------------------------


def _token(server: ResourceApiServer, who: tuple[str, str]) -> dict[str, str]:
    response = requests.post(f"{server.url}/login", json={"email": who[0], "password": who[1]}, timeout=10)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def _signed_get(server: ResourceApiServer, headers: dict[str, str], name: str, keypair: NodeKeyPair,
                fingerprint: str, node_key: SigningKey, *, node_id: str | None = None) -> dict[str, object]:
    """A release body exactly as an approved node builds it (lib/sealed/resource_client.py)."""
    nonce = requests.post(f"{server.url}/nodes/nonce", headers=headers, timeout=10).json()["nonce"]
    node_id = node_id or node_key.id
    message = node_request_message(kind="dek", folder="models", name=name,
                                   public_key=keypair.public_bytes(), fingerprint=fingerprint, nonce=nonce,
                                   node_id=node_id)
    return {"name": name, "public_key": keypair.public_key_b64(), "fingerprint": fingerprint,
            "node_id": node_id, "nonce": nonce, "signature": b64encode(node_key.sign(message))}


def _post_get(server: ResourceApiServer, headers: dict[str, str], body: dict[str, object]
              ) -> requests.Response:
    return requests.post(f"{server.url}/resources/get/models", json=body, headers=headers, timeout=10)


def test_a_stolen_reader_password_or_a_claimed_fingerprint_releases_nothing(
    server: ResourceApiServer,
) -> None:
    _publish(server, "target", os.urandom(5000))
    publisher = _client(server, PUBLISHER)
    before = publisher.fetch_count(name="target")
    # The thief has the reader's password and makes a node key of its own: it stays pending.
    thief_key = SigningKey.generate()
    thief = ResourceClient(server.url, *READER, retry=FAST_RETRY, node_key=thief_key)
    with pytest.raises(PermissionDeniedError, match="is pending"):
        thief.get("models", "target", NodeKeyPair.generate(), FP_C)
    headers = _token(server, READER)
    keypair = NodeKeyPair.generate()
    # An approved node's fingerprint claimed with the thief's key (new, so pending), or with the
    # approved node's id but the thief's signature.
    claimed = _signed_get(server, headers, "target", keypair, FP_A, thief_key)
    assert _post_get(server, headers, claimed).status_code == 403
    impersonated = _signed_get(server, headers, "target", keypair, FP_A, thief_key,
                               node_id=NODE_KEYS[FP_A].id)
    assert _post_get(server, headers, impersonated).status_code == 403
    # An approved node's key with another fingerprint than the one it enrolled with.
    moved = _signed_get(server, headers, "target", keypair, FP_C, NODE_KEYS[FP_A])
    assert _post_get(server, headers, moved).status_code == 403
    # The request of before this change: no node, no nonce, no signature.
    unsigned = {"name": "target", "public_key": keypair.public_key_b64(), "fingerprint": FP_A}
    assert _post_get(server, headers, unsigned).status_code == 422
    assert publisher.fetch_count(name="target") == before, "nothing was released"


def test_a_replayed_or_altered_release_request_releases_nothing(server: ResourceApiServer) -> None:
    _publish(server, "replayed", os.urandom(5000))
    publisher = _client(server, PUBLISHER)
    before = publisher.fetch_count(name="replayed")
    headers = _token(server, READER)
    body = _signed_get(server, headers, "replayed", NodeKeyPair.generate(), FP_A, NODE_KEYS[FP_A])
    assert _post_get(server, headers, body).status_code == 200
    assert _post_get(server, headers, body).status_code == 403, "a nonce is good once"
    # A captured request with the attacker's ephemeral key swapped in, or the nonce of a fresh one.
    captured = _signed_get(server, headers, "replayed", NodeKeyPair.generate(), FP_A, NODE_KEYS[FP_A])
    swapped = {**captured, "public_key": NodeKeyPair.generate().public_key_b64()}
    assert _post_get(server, headers, swapped).status_code == 403
    fresh = requests.post(f"{server.url}/nodes/nonce", headers=headers, timeout=10).json()["nonce"]
    assert _post_get(server, headers, {**captured, "nonce": fresh}).status_code == 403
    assert publisher.fetch_count(name="replayed") == before + 1, "only the genuine request released"


def test_an_all_zero_x25519_key_is_a_422_not_a_500(server: ResourceApiServer) -> None:
    headers = _token(server, READER)
    body = _signed_get(server, headers, "target", NodeKeyPair.generate(), FP_A, NODE_KEYS[FP_A])
    response = _post_get(server, headers, {**body, "public_key": b64encode(bytes(32))})
    assert response.status_code == 422 and "low-order" in response.json()["error"]["message"]


def test_twenty_failed_logins_are_throttled_with_retry_after(tmp_path: Path) -> None:
    server = start_resource_api_server(tmp_path / "throttled")
    try:
        server.create_user(*READER, role="reader")
        statuses, retry_after = [], []
        for n in range(20):
            response = requests.post(f"{server.url}/login", timeout=10,
                                     json={"email": READER[0], "password": f"guess-{n:04d}-wrong"})
            statuses.append(response.status_code)
            retry_after.append(response.headers.get("Retry-After"))
        assert statuses[:5] == [401] * 5 and statuses[5:] == [429] * 15, statuses
        assert all(value is not None and int(value) >= 1 for value in retry_after[5:])
        right = requests.post(f"{server.url}/login", timeout=10,
                              json={"email": READER[0], "password": READER[1]})
        assert right.status_code == 429, "while locked, even the right password is not checked"
        assert right.json()["error"]["code"] == "rate_limited"
        anonymous = requests.post(f"{server.url}/resources/get/models", data=b"x" * 100_000, timeout=10,
                                  headers={"Content-Type": "application/json"})
        assert anonymous.status_code == 401, "authenticated before the body is read"
    finally:
        server.stop()
