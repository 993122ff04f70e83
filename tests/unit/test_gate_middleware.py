"""GateMiddleware: rate-limit headers on every response of an admitted request, one usage record each."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from lib.accounts.auth import Principal
from lib.accounts.gate import Admission
from lib.accounts.rate_limit import RateDecision, RateLimitSpec
from lib.accounts.records import UsageRecord
from lib.errors import PermissionDeniedError
from lib.http.errors import install_error_handlers
from lib.http.gate import GateMiddleware, admission_of, attach_admission, endpoint_of, with_headers

PRINCIPAL = Principal("k1", frozenset({"infer"}), "api_key", RateLimitSpec(10, 60))
ALLOWED = RateDecision(True, 10, 7, 30.0, 0.0)


class Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.25  # every reading is 250 ms after the previous one
        return self.now


class Body(BaseModel):
    n: int


def make_app(records: list[UsageRecord]) -> FastAPI:
    api = FastAPI()
    api.add_middleware(GateMiddleware, record=records.append, clock=Ticks())
    install_error_handlers(api, logging.getLogger("test"))

    async def admitted(request: Request) -> Admission:
        if request.headers.get("authorization") != "Bearer good":
            from lib.errors import AuthenticationError

            raise AuthenticationError("no")
        admission = Admission(PRINCIPAL, ALLOWED)
        attach_admission(request.scope, admission)
        return admission

    @api.get("/items/{item_id}")
    async def item(item_id: str, admission: Admission = Depends(admitted)) -> dict[str, str]:
        admission.model_id, admission.image_count = f"model-{item_id}", 2
        return {"id": item_id}

    @api.post("/body")
    async def body(payload: Body, admission: Admission = Depends(admitted)) -> dict[str, int]:
        return {"n": payload.n}

    @api.get("/forbidden")
    async def forbidden(admission: Admission = Depends(admitted)) -> None:
        raise PermissionDeniedError("no scope")

    @api.get("/custom")
    async def custom(admission: Admission = Depends(admitted)) -> Any:
        from fastapi.responses import JSONResponse

        return JSONResponse({}, headers={"X-RateLimit-Limit": "set-by-route"})

    return api


@pytest.fixture
def records() -> list[UsageRecord]:
    return []


@pytest.fixture
def client(records: list[UsageRecord]) -> Iterator[TestClient]:
    with TestClient(make_app(records)) as test_client:
        yield test_client


GOOD = {"Authorization": "Bearer good"}


def test_success_gets_headers_and_one_record_with_the_route_template(
    client: TestClient, records: list[UsageRecord]
) -> None:
    response = client.get("/items/42", headers=GOOD)
    assert response.status_code == 200
    assert (response.headers["X-RateLimit-Limit"], response.headers["X-RateLimit-Remaining"]) == ("10", "7")
    assert response.headers["X-RateLimit-Reset"] == "30"
    assert "Retry-After" not in response.headers
    (record,) = records
    assert record.key_id == "k1" and record.endpoint == "GET /items/{item_id}"
    assert (record.status_code, record.model_id, record.image_count) == (200, "model-42", 2)
    assert record.latency_ms == pytest.approx(250.0)


def test_errors_after_admission_get_headers_and_are_recorded(
    client: TestClient, records: list[UsageRecord]
) -> None:
    forbidden = client.get("/forbidden", headers=GOOD)
    invalid = client.post("/body", json={"n": "many"}, headers=GOOD)
    assert (forbidden.status_code, invalid.status_code) == (403, 422)
    for response in (forbidden, invalid):
        assert response.headers["X-RateLimit-Limit"] == "10"
    assert [(r.endpoint, r.status_code, r.model_id) for r in records] == [
        ("GET /forbidden", 403, None), ("POST /body", 422, None),
    ]


def test_unauthenticated_and_unmatched_requests_are_neither_decorated_nor_recorded(
    client: TestClient, records: list[UsageRecord]
) -> None:
    for response in (client.get("/items/1"), client.get("/nowhere", headers=GOOD)):
        assert response.status_code in (401, 404)
        assert "X-RateLimit-Limit" not in response.headers
    assert records == []


def test_headers_the_response_set_itself_are_kept(client: TestClient) -> None:
    response = client.get("/custom", headers=GOOD)
    assert response.headers.get_list("X-RateLimit-Limit") == ["set-by-route"]
    assert response.headers["X-RateLimit-Remaining"] == "7"


def test_unhandled_exception_is_recorded_as_500_and_reraised() -> None:
    records: list[UsageRecord] = []

    async def failing_app(scope: Any, receive: Any, send: Any) -> None:
        attach_admission(scope, Admission(PRINCIPAL, ALLOWED))
        raise RuntimeError("boom")

    middleware = GateMiddleware(failing_app, record=records.append, clock=Ticks())
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/x"}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: Any) -> None:
        raise AssertionError("nothing may be sent")

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(middleware(scope, receive, send))
    (record,) = records
    assert (record.status_code, record.endpoint) == (500, "GET unmatched")


def test_a_failing_recorder_never_breaks_the_response(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_record: UsageRecord) -> None:
        raise OSError("disk full")

    api = make_app([])
    api.user_middleware.clear()
    api.add_middleware(GateMiddleware, record=broken)
    with TestClient(api) as test_client:
        assert test_client.get("/items/1", headers=GOOD).status_code == 200
    assert "could not record usage" in caplog.text


def test_non_http_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    asyncio.run(GateMiddleware(app, record=lambda r: None)({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert seen == ["lifespan"]


def test_helpers() -> None:
    scope: dict[str, Any] = {"method": "DELETE"}
    assert admission_of(scope) is None and endpoint_of(scope) == "DELETE unmatched"
    scope["state"] = {"admission": "not an admission"}
    assert admission_of(scope) is None
    assert with_headers([(b"a", b"1")], {"A": "2", "B": "3"}) == [(b"a", b"1"), (b"b", b"3")]


def test_a_request_answered_before_routing_is_counted_under_its_route_template() -> None:
    from fastapi import APIRouter, FastAPI

    from lib.http.gate import endpoint_of, matched_route

    app, admin = FastAPI(), APIRouter()
    app.add_api_route("/v1/classify", lambda: None, methods=["POST"])
    admin.add_api_route("/v1/admin/keys/{key_id}", lambda key_id: None, methods=["PATCH"])
    app.include_router(admin)  # FastAPI resolves included routers' routes at request time
    seen = []
    for method, path in (("POST", "/v1/classify"), ("PATCH", "/v1/admin/keys/k-123"), ("POST", "/random/x")):
        scope = {"type": "http", "method": method, "path": path, "root_path": "", "app": app}
        scope["route"] = matched_route(scope)
        seen.append(endpoint_of(scope))
    # Templates, never the raw path: ids and random paths must not become label values.
    assert seen == ["POST /v1/classify", "PATCH /v1/admin/keys/{key_id}", "POST unmatched"]
