"""Login backoff, bounded hashing and the request guard of the resource API (lib/resource_api)."""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lib.resource_api.app import create_app
from lib.resource_api.service import create_user
from lib.resource_api.settings import ResourceApiSettings
from lib.resource_api.throttle import BackoffPolicy, HashingSlots, LoginThrottle, ThrottledError
from lib.sealed.keywrap import b64encode
from tests.fake_clock import FakeClock

READER = ("reader@example.com", "reader-password-123")


def test_backoff_grows_after_the_free_failures_and_a_success_clears_it() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(address_policy=BackoffPolicy(3, 1.0, 8.0),
                             account_policy=BackoffPolicy(100, 1.0, 8.0), clock=clock)
    for _ in range(3):  # three tries, then locked
        throttle.check("a@x", "1.2.3.4")
        throttle.failed("a@x", "1.2.3.4")
    with pytest.raises(ThrottledError) as info:
        throttle.check("b@x", "1.2.3.4")  # any account from that address
    assert info.value.retry_after == 1 and info.value.status_code == 429
    throttle.check("a@x", "5.6.7.8")  # another address is not locked
    clock.now += 1.5
    throttle.failed("a@x", "1.2.3.4")
    with pytest.raises(ThrottledError) as info:
        throttle.check("a@x", "1.2.3.4")
    assert info.value.retry_after == 2
    for _ in range(10):
        throttle.failed("a@x", "1.2.3.4")
    with pytest.raises(ThrottledError) as info:
        throttle.check("a@x", "1.2.3.4")
    assert info.value.retry_after == 8, "capped"
    throttle.succeeded("a@x", "1.2.3.4")
    throttle.check("a@x", "1.2.3.4")


def test_an_account_is_locked_whatever_the_address_but_only_briefly() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(account_policy=BackoffPolicy(3, 1.0, 60.0), clock=clock)
    for n in range(3):
        throttle.failed("fleet@x", f"10.0.0.{n}")
    with pytest.raises(ThrottledError):
        throttle.check("fleet@x", "10.0.0.99")
    clock.now += 1.1
    throttle.check("fleet@x", "10.0.0.99")


def test_hashing_slots_bound_concurrency() -> None:
    slots = HashingSlots(1, wait_s=0.01)
    with slots.slot(), pytest.raises(ThrottledError), slots.slot():
        pass
    with slots.slot():
        pass
    seen: list[int] = []
    running = 0
    lock = threading.Lock()
    slots = HashingSlots(2, wait_s=5)

    def work() -> None:
        nonlocal running
        with slots.slot():
            with lock:
                running += 1
                seen.append(running)
            threading.Event().wait(0.01)
            with lock:
                running -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(seen) <= 2


@pytest.fixture
def client(tmp_path: Path) -> Any:
    settings = ResourceApiSettings(
        environment="production", database_url=f"sqlite:///{tmp_path / 'api.db'}",
        master_key=os.urandom(32).hex(), jwt_secret=secrets.token_urlsafe(48), max_upload_bytes=64 * 1024,
    )
    app = create_app(settings)
    create_user(app.state.service.store, email=READER[0], password=READER[1], role="reader")
    with TestClient(app) as test_client:
        yield test_client


def test_failed_logins_turn_into_429_with_retry_after_even_for_the_right_password(client: TestClient) -> None:
    statuses = [client.post("/login", json={"email": READER[0], "password": f"wrong-{n}"}).status_code
                for n in range(8)]
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}
    refused = client.post("/login", json={"email": READER[0], "password": READER[1]})
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limited"


def test_authentication_comes_before_the_body_and_each_route_has_its_cap(client: TestClient) -> None:
    body = {"name": "m", "public_key": "A" * 20_000}  # under the global cap (64 KiB here)
    anonymous = client.post("/resources/get/models", json=body)
    assert anonymous.status_code == 401, "refused on its headers, before the body"
    token = client.post("/login", json={"email": READER[0], "password": READER[1]}).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    capped = client.post("/resources/get/models", json=body, headers=headers)
    assert capped.status_code == 413 and "4096" in capped.json()["error"]["message"]
    assert client.post("/login", json={"email": "x" * 5000 + "@x", "password": "p"}).status_code == 413
    assert client.post("/nodes/nonce", json=body, headers=headers).status_code == 413
    # Only the upload route takes large bodies: this one is read, and refused for its content.
    assert client.post("/resources/models", json=body, headers=headers).status_code == 422
    assert client.get("/no/such/route").status_code == 404


def test_an_all_zero_x25519_key_is_a_422_not_a_500(client: TestClient) -> None:
    token = client.post("/login", json={"email": READER[0], "password": READER[1]}).json()["access_token"]
    body = {"name": "m", "public_key": b64encode(bytes(32)), "fingerprint": "f" * 64, "node_id": "0" * 64,
            "nonce": "n" * 43, "signature": b64encode(bytes(64))}
    response = client.post("/resources/get/models", json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 422, response.text
    assert "low-order" in response.json()["error"]["message"]
