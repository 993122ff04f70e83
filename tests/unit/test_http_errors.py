"""The one error body, request ids and body guards, through a tiny FastAPI app and TestClient."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

import lib.errors
from lib.errors import SealserveError
from lib.http.context import RequestContextMiddleware
from lib.http.errors import REQUEST_ID_HEADER, install_error_handlers

LIMIT = 256
LOGGER = "tests.http_errors"
SECRET_DETAIL = "db password is hunter2"

ERROR_CLASSES: dict[str, type[SealserveError]] = {
    name: cls
    for name, cls in vars(lib.errors).items()
    if inspect.isclass(cls) and issubclass(cls, SealserveError)
}


class Item(BaseModel):
    name: str = Field(min_length=1)
    count: int = Field(ge=0)


def make_app(*, proxy: bool = False, json_only: bool = True, limit: int = LIMIT) -> FastAPI:
    app = FastAPI()

    @app.get("/raise/{name}")
    def raise_error(name: str) -> None:
        raise ERROR_CLASSES[name](f"message of {name}")

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError(SECRET_DETAIL)

    @app.post("/items")
    def create(item: Item) -> dict[str, Any]:
        return {"ok": True, "item": item.model_dump()}

    @app.get("/ok")
    def ok() -> dict[str, str]:
        return {"status": "fine"}

    install_error_handlers(app, logging.getLogger(LOGGER))
    app.add_middleware(
        RequestContextMiddleware, max_body_bytes=limit, json_only=json_only, proxy_sets_request_id=proxy
    )
    return app


@pytest.fixture
def client() -> TestClient:
    # The last-resort handler answers, then Starlette re-raises for the server to log: don't let
    # the test client turn that into a test error.
    return TestClient(make_app(), raise_server_exceptions=False)


@pytest.fixture
def proxy_client() -> TestClient:
    return TestClient(make_app(proxy=True), raise_server_exceptions=False)


def error_of(response: Any, status: int, code: str) -> dict[str, str]:
    """The error object of a response, after checking the exact body shape and the request id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"code", "message", "request_id"}
    assert all(isinstance(v, str) and v for v in error.values())
    assert error["code"] == code
    return error


def has_matching_request_id(response: Any) -> bool:
    return response.headers.get(REQUEST_ID_HEADER) == response.json()["error"]["request_id"]


# --- lib.errors classes ----------------------------------------------------------------------------


def test_error_classes_are_found() -> None:
    assert {"BadRequestError", "AuthenticationError", "ModelNotFoundError", "IntegrityError"} <= set(
        ERROR_CLASSES
    )


@pytest.mark.parametrize("name", sorted(ERROR_CLASSES))
def test_each_error_class_maps_to_its_status_and_code(client: TestClient, name: str) -> None:
    cls = ERROR_CLASSES[name]
    response = client.get(f"/raise/{name}")
    error = error_of(response, cls.status_code, cls.code)
    # A 500 may describe internals: its message is generic, whatever the exception said.
    expected = "internal server error" if cls.status_code == 500 else f"message of {name}"
    assert error["message"] == expected
    assert has_matching_request_id(response)
    if cls.status_code == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"
    else:
        assert "WWW-Authenticate" not in response.headers
    # A dependency away (e.g. a model replica being replaced): the client is told when to retry.
    if cls.status_code == 503:
        assert int(response.headers["Retry-After"]) >= 1
    elif cls.status_code != 429:
        assert "Retry-After" not in response.headers


@pytest.mark.parametrize(
    ("name", "status"),
    [("BadRequestError", 400), ("AuthenticationError", 401), ("PermissionDeniedError", 403),
     ("ModelNotFoundError", 404), ("PayloadTooLargeError", 413), ("UnsupportedMediaTypeError", 415),
     ("ValidationFailedError", 422), ("RateLimitedError", 429), ("ModelUnavailableError", 503),
     ("GatewayTimeoutError", 504)],
)
def test_documented_status_codes(client: TestClient, name: str, status: int) -> None:
    # Pins the table of DESIGN §3 independently of the class attributes read above.
    assert client.get(f"/raise/{name}").status_code == status


# --- request ids -------------------------------------------------------------------------------------


def test_generated_request_ids_are_unique(client: TestClient) -> None:
    ids = {client.get("/raise/NotFoundError").json()["error"]["request_id"] for _ in range(5)}
    assert len(ids) == 5


def test_successful_response_carries_a_request_id(client: TestClient) -> None:
    response = client.get("/ok")
    assert response.json() == {"status": "fine"}
    assert len(response.headers[REQUEST_ID_HEADER]) >= 16


@pytest.mark.parametrize("supplied", ["abc-123", "trace:1.2_3", "X" * 128, "0"])
def test_plain_client_request_id_is_kept(client: TestClient, supplied: str) -> None:
    response = client.get("/raise/NotFoundError", headers={REQUEST_ID_HEADER: supplied})
    assert error_of(response, 404, "not_found")["request_id"] == supplied
    assert response.headers[REQUEST_ID_HEADER] == supplied


@pytest.mark.parametrize("supplied", ["X" * 129, "has space", "a/b", "<script>", "id;drop", "a%2Fb"])
def test_weird_client_request_id_is_replaced(client: TestClient, supplied: str) -> None:
    response = client.get("/raise/NotFoundError", headers={REQUEST_ID_HEADER: supplied})
    request_id = error_of(response, 404, "not_found")["request_id"]
    assert request_id != supplied and supplied not in response.text
    assert response.headers[REQUEST_ID_HEADER] == request_id


@pytest.mark.parametrize("path", ["/raise/NotFoundError", "/ok"])
def test_proxy_mode_reads_the_id_and_leaves_the_header_to_the_proxy(
    proxy_client: TestClient, path: str
) -> None:
    response = proxy_client.get(path, headers={REQUEST_ID_HEADER: "proxy-chosen-id"})
    assert REQUEST_ID_HEADER not in response.headers
    if path != "/ok":
        assert error_of(response, 404, "not_found")["request_id"] == "proxy-chosen-id"


@pytest.mark.parametrize("supplied", ["X" * 129, "has space", "<script>alert(1)</script>", "a\tb", "id;drop"])
def test_proxy_mode_never_puts_a_weird_client_id_in_the_body(proxy_client: TestClient, supplied: str) -> None:
    # Serve's proxy passes a client's X-Request-ID through as sent.
    response = proxy_client.get("/raise/NotFoundError", headers={REQUEST_ID_HEADER: supplied})
    request_id = error_of(response, 404, "not_found")["request_id"]
    assert request_id != supplied and supplied not in response.text
    assert len(request_id) >= 16


def test_proxy_mode_without_an_id_still_fills_the_body(proxy_client: TestClient) -> None:
    response = proxy_client.get("/raise/NotFoundError")
    assert REQUEST_ID_HEADER not in response.headers
    assert len(error_of(response, 404, "not_found")["request_id"]) >= 16


def test_proxy_mode_body_guards_still_apply(proxy_client: TestClient) -> None:
    response = proxy_client.post(
        "/items", content=b"x" * (LIMIT + 1), headers={"content-type": "application/json",
                                                       REQUEST_ID_HEADER: "proxy-id"}
    )
    assert error_of(response, 413, "payload_too_large")["request_id"] == "proxy-id"
    assert REQUEST_ID_HEADER not in response.headers


# --- bodies --------------------------------------------------------------------------------------------


def test_valid_body_reaches_the_route(client: TestClient) -> None:
    response = client.post("/items", json={"name": "a", "count": 2})
    assert response.status_code == 200
    assert response.json() == {"ok": True, "item": {"name": "a", "count": 2}}


@pytest.mark.parametrize("content", [b'{"name": "a", "count": ', b"{'name': 'a'}", b"not json"])
def test_malformed_json_is_400(client: TestClient, content: bytes) -> None:
    response = client.post("/items", content=content, headers={"content-type": "application/json"})
    error = error_of(response, 400, "bad_request")
    assert "not valid JSON" in error["message"]
    assert has_matching_request_id(response)


@pytest.mark.parametrize(
    ("payload", "fields"),
    [
        ({"name": "a"}, ["count"]),
        ({"name": "", "count": 1}, ["name"]),
        ({"name": "a", "count": -1}, ["count"]),
        ({"count": "many"}, ["name", "count"]),
        ([1, 2], []),
    ],
)
def test_validation_error_is_422_naming_the_fields(
    client: TestClient, payload: Any, fields: list[str]
) -> None:
    response = client.post("/items", json=payload)
    error = error_of(response, 422, "validation_error")
    for field in fields:
        assert f"{field}: " in error["message"]
    assert "body." not in error["message"]  # the location is the field, not FastAPI's 'body.' prefix
    assert has_matching_request_id(response)


def test_content_length_over_the_limit_is_413(client: TestClient) -> None:
    body = json.dumps({"name": "n" * LIMIT, "count": 1}).encode()
    response = client.post("/items", content=body, headers={"content-type": "application/json"})
    error = error_of(response, 413, "payload_too_large")
    assert str(LIMIT) in error["message"]
    assert has_matching_request_id(response)


def test_content_length_at_the_limit_is_accepted(client: TestClient) -> None:
    prefix, suffix = b'{"name": "', b'", "count": 1}'
    body = prefix + b"n" * (LIMIT - len(prefix) - len(suffix)) + suffix
    assert len(body) == LIMIT
    response = client.post("/items", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200


def chunks(total: int, size: int = 32) -> Iterator[bytes]:
    body = json.dumps({"name": "n" * total, "count": 1}).encode()
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_chunked_body_over_the_limit_is_413(client: TestClient) -> None:
    response = client.post("/items", content=chunks(LIMIT * 4), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers  # really sent chunked
    error_of(response, 413, "payload_too_large")
    assert has_matching_request_id(response)


def test_chunked_body_under_the_limit_is_accepted(client: TestClient) -> None:
    response = client.post("/items", content=chunks(10), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 200
    assert response.json()["item"] == {"name": "n" * 10, "count": 1}


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/json-patch+json", None]
)
def test_non_json_body_is_415(client: TestClient, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/items", content=b'{"name": "a", "count": 1}', headers=headers)
    error = error_of(response, 415, "unsupported_media_type")
    assert "application/json" in error["message"]
    assert has_matching_request_id(response)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_content_type_variants_are_accepted(client: TestClient, content_type: str) -> None:
    response = client.post(
        "/items", content=b'{"name": "a", "count": 1}', headers={"content-type": content_type}
    )
    assert response.status_code == 200


def test_json_only_off_lets_other_media_types_through() -> None:
    client = TestClient(make_app(json_only=False))
    # Past the middleware, FastAPI itself does not read a text/plain body as JSON: 422, not 415.
    body = b'{"name": "a", "count": 1}'
    response = client.post("/items", content=body, headers={"content-type": "text/plain"})
    error_of(response, 422, "validation_error")


# --- routing errors ---------------------------------------------------------------------------------------


def test_unknown_route_is_404_in_the_body_shape(client: TestClient) -> None:
    response = client.get("/no/such/route")
    error_of(response, 404, "not_found")
    assert has_matching_request_id(response)


def test_wrong_method_is_405_in_the_body_shape(client: TestClient) -> None:
    response = client.delete("/items")
    error_of(response, 405, "method_not_allowed")


# --- the last resort -------------------------------------------------------------------------------------


def test_unexpected_error_is_a_generic_500_and_logged(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        response = client.get("/boom", headers={REQUEST_ID_HEADER: "trace-500"})
    error = error_of(response, 500, "internal_error")
    assert error == {"code": "internal_error", "message": "internal server error", "request_id": "trace-500"}
    for leak in (SECRET_DETAIL, "RuntimeError", "Traceback", "boom", ".py"):
        assert leak not in response.text

    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert record.levelno == logging.ERROR
    assert "trace-500" in record.getMessage() and "/boom" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    assert SECRET_DETAIL in caplog.text and "Traceback" in caplog.text


def test_unexpected_error_carries_the_request_id_header(client: TestClient) -> None:
    response = client.get("/boom")
    assert has_matching_request_id(response)


# --- the middleware as a plain ASGI app -------------------------------------------------------------------


async def _drive(middleware: RequestContextMiddleware, headers: list[tuple[bytes, bytes]]) -> list[Any]:
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/items", "headers": headers, "query_string": b""}
    await middleware(scope, receive, send)
    return sent


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(b"content-length", b"abc"), (b"content-type", b"application/json")], 400),
        ([(b"content-length", b"-1"), (b"content-type", b"application/json")], 400),
        ([(b"content-length", str(LIMIT + 1).encode()), (b"content-type", b"application/json")], 413),
        ([(b"content-length", b"2"), (b"content-type", b"text/csv")], 415),
        ([(b"transfer-encoding", b"chunked")], 415),
    ],
)
def test_refused_requests_never_reach_the_app(headers: list[tuple[bytes, bytes]], status: int) -> None:
    reached: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope)

    sent = asyncio.run(_drive(RequestContextMiddleware(app, max_body_bytes=LIMIT), headers))
    assert reached == []
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == status
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["error"]["code"] in {"bad_request", "payload_too_large", "unsupported_media_type"}
    header_names = {name.lower() for name, _ in sent[0]["headers"]}
    assert REQUEST_ID_HEADER.lower().encode() in header_names
