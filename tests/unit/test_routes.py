"""The ingress's FastAPI app (deployments/ingress.py + deployments/routes/) in process.

Real account collaborators (lib/accounts/wiring.py on a SQLite file, a real sliding-window
limiter) and real ModelClients over fake deployment handles; no Ray. What a client sees: status
codes, error bodies, rate-limit headers (the last-resort 500 included), credentials marked
no-store, and one usage record per admitted request.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from deployments.ingress import create_api
from deployments.model_clients import ModelClients
from lib.accounts.auth import bootstrap_subject
from lib.accounts.concurrency import ConcurrencySlots, GenerationGrant, SharedCompute
from lib.accounts.rate_limit import Grant, RateLimitSpec, SlidingWindowLimiter
from lib.accounts.settings import AccountsSettings
from lib.accounts.wiring import AccountsWiring, build_accounts
from lib.errors import ModelNotFoundError
from lib.settings import AppSettings
from tests.unit.test_routes_model_clients import (
    MODEL,
    FakeHandle,
    FakeLoader,
    classifier,
    raising,
    text_to_image,
)

SECRET = "route-test-secret-0123456789abcdefghijklmnop"
ADMIN_KEY = "ss_route_test_bootstrap_key_0123456789abcdef"
RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


class LocalLimiter:
    """The application's shared limiter (rate limits, budgets, concurrency slots), in process."""

    def __init__(self) -> None:
        self._limiter = SlidingWindowLimiter()
        self.compute = SharedCompute(self._limiter, ConcurrencySlots())

    async def take(self, key: str, limit: int, window_s: int, count: int, minimum: int = 1) -> Grant:
        return self._limiter.take(key, limit, window_s, count, minimum=minimum)

    async def admit_generation(
        self, subject: str, budget: RateLimitSpec | None, cost: int, max_concurrent: int, ttl_s: float
    ) -> GenerationGrant:
        return self.compute.admit_generation(subject, budget, cost, max_concurrent, ttl_s)

    async def release(self, subject: str, slot: int) -> None:
        self.compute.release(subject, slot)


@dataclass
class Ingress:
    client: TestClient
    accounts: AccountsWiring
    text_to_image: FakeHandle
    loader: FakeLoader

    def usage(self, key_id: str) -> list[tuple[str, int]]:
        """(endpoint, status) of every recorded request of ``key_id``, written to the database first."""
        assert self.accounts.usage.flush(5.0)
        summary = self.accounts.store.usage_summary(key_id=key_id)
        return sorted(summary.by_endpoint.items())


@pytest.fixture
def ingress(tmp_path: Path) -> Iterator[Ingress]:
    settings = AppSettings.from_args({}, env={})
    accounts = build_accounts(
        AccountsSettings(bootstrap_rate_limit="100/minute"),
        database_url=f"sqlite:///{(tmp_path / 'accounts.db').as_posix()}",
        secret_key=SECRET,
        bootstrap_keys=[ADMIN_KEY],
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        limiter=LocalLimiter(),
    )
    t2i = text_to_image()
    loader = FakeLoader()
    models = ModelClients(t2i, classifier(), loader, timeout_s=2.0)  # type: ignore[arg-type]
    api = create_api(settings, accounts=accounts, models=models, loader=loader)  # type: ignore[arg-type]
    try:
        with TestClient(api, raise_server_exceptions=False) as client:
            yield Ingress(client, accounts, t2i, loader)
    finally:
        accounts.close(5.0)


def bearer(credential: str = ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    return error


def create_key(ingress: Ingress, scopes: list[str], rate_limit: str = "100/minute") -> dict[str, Any]:
    response = ingress.client.post(
        "/v1/admin/keys", json={"name": "test", "scopes": scopes, "rate_limit": rate_limit}, headers=bearer()
    )
    assert response.status_code == 201, response.text
    assert response.headers["Cache-Control"] == "no-store"
    created: dict[str, Any] = response.json()
    return created


def test_info_and_health_need_no_credentials(ingress: Ingress) -> None:
    for path in ("/", "/v1"):
        info = ingress.client.get(path).json()
        assert info["api_version"] == "v1" and info["links"]["infer"] == "/v1/infer"
    for path in ("/health", "/v1/health"):
        health = ingress.client.get(path)
        assert health.status_code == 200
        assert (health.json()["status"], health.json()["ready"]) == ("ok", True)
        assert "X-RateLimit-Limit" not in health.headers


def test_health_shows_internals_only_to_an_admin(ingress: Ingress) -> None:
    ingress.loader.errors = {
        "sealed-a": "AuthenticationError: resource API at http://resources.internal:9000 rejected "
        "reader@corp.example"
    }
    anonymous = ingress.client.get("/health")
    assert anonymous.status_code == 200
    assert set(anonymous.json()) == {"status", "ready", "version"}
    assert anonymous.json()["status"] == "degraded"
    assert "internal" not in anonymous.text and "corp.example" not in anonymous.text

    admin = ingress.client.get("/health", headers=bearer())
    assert admin.status_code == 200
    assert any("resources.internal" in e for e in admin.json()["errors"])
    assert {d["deployment"] for d in admin.json()["deployments"]} == {"TextToImage", "ImageClassifier"}

    infer_only = create_key(ingress, ["infer"])["key"]
    error_of(ingress.client.get("/health", headers=bearer(infer_only)), 403, "forbidden")
    error_of(ingress.client.get("/health", headers=bearer("ss_not_a_key_0123456789")), 401, "unauthorized")


def test_models_need_a_credential_and_answer_with_rate_headers(ingress: Ingress) -> None:
    error = error_of(ingress.client.get("/v1/models"), 401, "unauthorized")
    assert error["message"] and "X-RateLimit-Limit" not in ingress.client.get("/v1/models").headers
    listed = ingress.client.get("/v1/models", headers=bearer())
    assert listed.status_code == 200
    assert listed.json()["count"] == 2 and listed.json()["models"][0]["id"] == MODEL

    assert all(name in listed.headers for name in RATE_HEADERS)
    assert listed.headers["X-RateLimit-Limit"] == "100"
    one = ingress.client.get(f"/v1/models/{MODEL}", headers=bearer())
    assert one.status_code == 200 and one.json()["id"] == MODEL
    error_of(ingress.client.get("/v1/models/unknown", headers=bearer()), 404, "model_not_found")
    assert ingress.usage(bootstrap_subject(ADMIN_KEY)) == [
        ("GET /v1/models", 1), ("GET /v1/models/{model_id}", 2),
    ]


def test_models_show_no_paths_of_the_node(ingress: Ingress) -> None:
    ingress.loader.catalog[0] = ingress.loader.catalog[0].model_copy(
        update={"path": "/srv/models/secret-name"}
    )
    listed = ingress.client.get("/v1/models", headers=bearer()).json()
    one = ingress.client.get(f"/v1/models/{MODEL}", headers=bearer()).json()
    assert [m["path"] for m in listed["models"]] == [None, None] and one["path"] is None
    assert "/srv/models" not in str(listed) + str(one)


def test_infer_answers_under_both_paths(ingress: Ingress) -> None:
    body = {"id": "r1", "model_id": MODEL, "prompt": "a cat", "num_images": 2}
    for path in ("/v1/infer", "/infer"):
        response = ingress.client.post(path, json=body, headers=bearer())
        assert response.status_code == 200, response.text
        assert [image["seed"] for image in response.json()["images"]] == [0, 1]
        assert response.headers["X-RateLimit-Limit"] == "100"
    assert ingress.text_to_image.options_calls == [MODEL]  # one configured handle, reused


def test_authentication_comes_before_validation(ingress: Ingress) -> None:
    bad = {"id": "r1", "model_id": MODEL, "prompt": "a cat", "width": 7}
    error_of(ingress.client.post("/v1/infer", json=bad), 401, "unauthorized")
    invalid = ingress.client.post("/v1/infer", json=bad, headers=bearer())
    assert "width" in error_of(invalid, 422, "validation_error")["message"]
    assert invalid.headers["X-RateLimit-Limit"] == "100"


def test_a_key_without_the_scope_is_refused_with_rate_headers(ingress: Ingress) -> None:
    key = create_key(ingress, ["classify"])
    refused = ingress.client.get("/v1/models", headers=bearer(key["key"]))
    error_of(refused, 403, "forbidden")
    assert refused.headers["X-RateLimit-Limit"] == "100"
    classified = ingress.client.post("/v1/classify", json={"image": "aGk="}, headers=bearer(key["key"]))
    assert classified.status_code == 200 and classified.json()["predictions"][0]["label"] == "cat"
    assert ingress.usage(key["id"]) == [("GET /v1/models", 1), ("POST /v1/classify", 1)]


def test_over_the_limit_is_429_with_retry_after(ingress: Ingress) -> None:
    key = create_key(ingress, ["infer"], "2/minute")
    statuses = [ingress.client.get("/v1/models", headers=bearer(key["key"])) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    refused = statuses[-1]
    error_of(refused, 429, "rate_limited")
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert int(refused.headers["Retry-After"]) >= 1


def test_an_unexpected_error_is_a_generic_500_with_rate_headers_and_one_record(ingress: Ingress) -> None:
    ingress.loader.fail = RuntimeError("internal detail /secret/path")
    response = ingress.client.get("/v1/models", headers={**bearer(), "X-Request-ID": "trace-500"})
    error = error_of(response, 500, "internal_error")
    assert error == {"code": "internal_error", "message": "internal server error", "request_id": "trace-500"}
    assert "secret" not in response.text
    assert response.headers["X-RateLimit-Limit"] == "100"
    assert response.headers.get_list("X-RateLimit-Remaining") == ["99"]  # added once
    assert ingress.usage(bootstrap_subject(ADMIN_KEY)) == [("GET /v1/models", 1)]
    summary = ingress.accounts.store.usage_summary(key_id=bootstrap_subject(ADMIN_KEY))
    assert summary.successful_requests == 0


def test_a_model_error_keeps_its_status(ingress: Ingress) -> None:
    ingress.text_to_image.methods["generate"] = raising(ModelNotFoundError("no model 'x'"))
    body = {"id": "r1", "model_id": MODEL, "prompt": "a cat"}
    response = ingress.client.post("/v1/infer", json=body, headers=bearer())
    assert error_of(response, 404, "model_not_found")["message"] == "no model 'x'"


def test_an_unknown_model_is_404_before_any_model_call(ingress: Ingress) -> None:
    body = {"id": "r1", "model_id": "x", "prompt": "a cat"}
    response = ingress.client.post("/v1/infer", json=body, headers=bearer())
    assert error_of(response, 404, "model_not_found")["message"] == "model 'x' is not in the catalog"
    assert ingress.text_to_image.calls == []


def test_token_exchange_is_not_cached_and_a_token_cannot_renew_itself(ingress: Ingress) -> None:
    key = create_key(ingress, ["infer"])
    issued = ingress.client.post("/v1/auth/token", headers=bearer(key["key"]))
    assert issued.status_code == 200 and issued.headers["Cache-Control"] == "no-store"
    token = issued.json()["access_token"]
    assert ingress.client.get("/v1/models", headers=bearer(token)).status_code == 200
    error_of(ingress.client.post("/v1/auth/token", headers=bearer(token)), 403, "forbidden")


@pytest.mark.parametrize(
    ("method", "path", "params", "body"),
    [
        ("get", "/v1/usage", {"since": "999999w"}, None),
        ("get", "/v1/admin/usage", {"since": "999999w"}, None),
        ("get", "/v1/admin/usage/summary", {"since": "999999w"}, None),
        ("get", "/v1/admin/usage", {"since": "9999-12-31T23:00:00-05:00"}, None),
        ("get", "/v1/usage", {"since": "0001-01-01T00:00:00+05:00"}, None),
        ("post", "/v1/admin/keys", None, {"name": "n", "scopes": ["infer"], "expires_in": "999999w"}),
        ("post", "/v1/admin/keys", None, {"name": "n", "scopes": ["infer"], "expires_in": "5300000d"}),
    ],
)
def test_out_of_range_times_are_a_422_not_a_500(
    ingress: Ingress, method: str, path: str, params: dict[str, str] | None, body: dict[str, Any] | None
) -> None:
    response = ingress.client.request(method.upper(), path, params=params, json=body, headers=bearer())
    error_of(response, 422, "validation_error")


def test_a_token_whose_key_row_is_gone_is_refused(ingress: Ingress) -> None:
    key = create_key(ingress, ["infer", "admin"])
    token = ingress.client.post("/v1/auth/token", headers=bearer(key["key"])).json()["access_token"]
    with ingress.accounts.store._engine.begin() as connection:  # the row is deleted out of band
        connection.execute(text("DELETE FROM api_keys WHERE id = :id"), {"id": key["id"]})
    error_of(ingress.client.get("/v1/admin/keys", headers=bearer(token)), 401, "unauthorized")
    error_of(ingress.client.get("/v1/models", headers=bearer(token)), 401, "unauthorized")


def test_admin_routes_need_the_admin_scope(ingress: Ingress) -> None:
    key = create_key(ingress, ["infer"])
    error_of(ingress.client.get("/v1/admin/keys", headers=bearer(key["key"])), 403, "forbidden")
    token = ingress.client.post("/v1/auth/token", headers=bearer(key["key"])).json()["access_token"]
    assert ingress.client.get("/v1/models", headers=bearer(token)).status_code == 200
    listed = ingress.client.get("/v1/admin/keys", headers=bearer())
    assert [k["id"] for k in listed.json()["keys"]] == [key["id"]]
    assert ingress.client.get(f"/v1/admin/keys/{key['id']}", headers=bearer()).json()["revoked"] is False
    revoked = ingress.client.delete(f"/v1/admin/keys/{key['id']}", headers=bearer())
    assert revoked.json()["revoked"] is True
    # Revoked here, so this replica looks the key up again at once: its tokens stop working.
    error_of(ingress.client.get("/v1/models", headers=bearer(token)), 401, "unauthorized")
    error_of(ingress.client.get("/v1/admin/keys/" + "x" * 65, headers=bearer()), 422, "validation_error")
    own = ingress.client.get("/v1/usage", headers=bearer(), params={"since": "7d"})
    assert own.status_code == 200
    stats = ingress.client.get("/v1/admin/usage", headers=bearer(), params={"by": "endpoint"})
    assert stats.status_code == 200 and stats.json()["by"] == "endpoint"
    summary = ingress.client.get("/v1/admin/usage/summary", headers=bearer(), params={"key_id": key["id"]})
    assert summary.status_code == 200
    cleanup = ingress.client.post("/v1/admin/usage/cleanup", json={"older_than": "30d"}, headers=bearer())
    assert cleanup.status_code == 200 and cleanup.json()["older_than"] == "30d"


def test_compute_is_charged_reported_refused_and_changeable(ingress: Ingress) -> None:
    created = ingress.client.post(
        "/v1/admin/keys",
        json={"name": "b", "scopes": ["infer", "classify"], "rate_limit": "100/minute", "budget": "100/hour"},
        headers=bearer(),
    ).json()
    assert (created["budget"], created["max_concurrent"]) == ("100/hour", 2)  # the default cap
    key = bearer(created["key"])
    body = {"id": "r1", "model_id": MODEL, "prompt": "a cat", "num_inference_steps": 30}
    generated = ingress.client.post("/v1/infer", json=body, headers=key)
    assert generated.status_code == 200, generated.text
    assert (generated.headers["X-Cost"], generated.headers["X-Budget-Remaining"]) == ("30", "70")
    classified = ingress.client.post("/v1/classify", json={"image": "aGk="}, headers=key)
    assert (classified.headers["X-Cost"], classified.headers["X-Budget-Remaining"]) == ("1", "69")
    refused = ingress.client.post("/v1/infer", json={**body, "num_inference_steps": 70}, headers=key)
    error = error_of(refused, 429, "rate_limited")
    assert "costs 70, 69 remain" in error["message"]
    assert int(refused.headers["Retry-After"]) > 3000 and refused.headers["X-Cost"] == "0"
    assert refused.headers["X-RateLimit-Limit"] == "100"  # the rate limit's headers as well
    too_big = ingress.client.post("/v1/infer", json={**body, "width": 1024, "height": 1024}, headers=key)
    assert "whole budget" in error_of(too_big, 422, "validation_error")["message"]
    assert len(ingress.text_to_image.calls) == 1  # the refused requests never reached the model
    assert ingress.accounts.usage.flush(5.0)
    assert ingress.client.get("/v1/usage", headers=key).json()["total_cost"] == 31
    stats = ingress.client.get("/v1/admin/usage", headers=bearer(), params={"by": "key"}).json()
    assert {g["group"]: g["cost"] for g in stats["groups"]}[created["id"]] == 31
    changed = ingress.client.patch(
        f"/v1/admin/keys/{created['id']}", json={"budget": None, "max_concurrent": 5}, headers=bearer()
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["budget"], changed.json()["max_concurrent"], changed.json()["rate_limit"]) == (
        None, 5, "100/minute",
    )
    bad = ingress.client.patch(f"/v1/admin/keys/{created['id']}", json={"budget": "x"}, headers=bearer())
    assert "invalid budget" in error_of(bad, 422, "validation_error")["message"]
    missing = ingress.client.patch("/v1/admin/keys/nope", json={"max_concurrent": 1}, headers=bearer())
    error_of(missing, 404, "not_found")
    forbidden = ingress.client.patch(f"/v1/admin/keys/{created['id']}", json={"budget": None}, headers=key)
    error_of(forbidden, 403, "forbidden")


# --- authentication before the body, and per-route body caps ------------------------------------


def call_asgi(
    ingress: Ingress, path: str, headers: dict[str, str], chunks: list[bytes]
) -> tuple[int, int, bytes]:
    """POST ``chunks`` straight to the app: (status, chunks the app asked for, response body)."""
    import asyncio

    asked = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal asked
        asked += 1
        if asked > len(chunks):
            await asyncio.sleep(3600)  # a client that never finishes sending
        return {"type": "http.request", "body": chunks[asked - 1], "more_body": asked < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "server": ("test", 80), "client": ("test", 1),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(asyncio.wait_for(ingress.client.app(scope, receive, send), 10))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, asked, body


MIB = 1024 * 1024


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/infer", "/v1/auth/token", "/v1/admin/keys"])
@pytest.mark.parametrize("credential", [None, "ss_" + "x" * 43, "not-a-key", "a.b.c"])
def test_an_unauthenticated_body_is_answered_401_without_reading_it(
    ingress: Ingress, path: str, credential: str | None
) -> None:
    headers = {"content-type": "application/json", "content-length": str(19 * MIB)}
    if credential is not None:
        headers["authorization"] = f"Bearer {credential}"
    status, asked, body = call_asgi(ingress, path, headers, [b"{" * MIB] * 19)
    assert (status, asked) == (401, 0)
    assert b'"unauthorized"' in body


def test_bodies_are_capped_by_route_up_front_and_while_streaming(ingress: Ingress) -> None:
    auth = {"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
    # Declared too large for the route: 413 before reading (infer, token and admin take 64 KiB).
    for path in ("/v1/infer", "/v1/auth/token", "/v1/admin/keys"):
        status, asked, _ = call_asgi(ingress, path, {**auth, "content-length": str(64 * 1024 + 1)}, [b" "])
        assert (status, asked) == (413, 0), path
    # Sent without a length: counted while it streams, refused at the first chunk past the cap.
    status, asked, body = call_asgi(ingress, "/v1/infer", auth, [b" " * 16 * 1024] * 100)
    assert (status, asked) == (413, 5) and b"65536 bytes" in body
    # The image route takes up to the configured size (20 MiB by default).
    image = b'{"image": "' + b"A" * (2 * MIB) + b'"}'
    status, _, body = call_asgi(ingress, "/v1/classify", {**auth, "content-length": str(len(image))}, [image])
    assert status == 200, body
    status, asked, _ = call_asgi(ingress, "/v1/classify", {**auth, "content-length": str(21 * MIB)}, [b" "])
    assert (status, asked) == (413, 0)
