"""HTTP plumbing shared by sealserve's two FastAPI apps (the ingress and the resource API).

This and ``lib/resource_api`` are the only modules of ``lib/`` that import FastAPI/Starlette:
they hold no business logic, only the mapping of the one error hierarchy to the one error body
``{"error": {"code", "message", "request_id"}}`` and a request-context middleware.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from lib.errors import (
    BadRequestError,
    PayloadTooLargeError,
    SealserveError,
    UnsupportedMediaTypeError,
    ValidationFailedError,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "service_unavailable",
    504: "timeout",
}


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or "-")


def error_response(
    status_code: int, code: str, message: str, request_id: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    return JSONResponse(body, status_code=status_code, headers=headers)


def sealserve_error_response(exc: SealserveError, request_id: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    # A 500 is our fault, and its message may describe internals: the client gets a generic one.
    message = "internal server error" if exc.status_code == 500 else exc.message
    return error_response(exc.status_code, exc.code, message, request_id, headers)


def validation_message(exc: RequestValidationError) -> tuple[str, int]:
    """One readable line naming each bad field, and the status it deserves."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return "request body is not valid JSON", 400
    parts = []
    for error in errors[:5]:
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return "; ".join(parts), 422


def install_error_handlers(app: FastAPI, log: logging.Logger) -> None:
    """Every error, expected or not, leaves as the documented body with the request id."""

    async def on_sealserve_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, SealserveError)
        return sealserve_error_response(exc, request_id_of(request))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, status = validation_message(exc)
        error = BadRequestError(message) if status == 400 else ValidationFailedError(message)
        return sealserve_error_response(error, request_id_of(request))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        # FastAPI turns an error raised while reading the body (our size limit) into a 400.
        if isinstance(exc.__cause__, SealserveError):
            return sealserve_error_response(exc.__cause__, request_id_of(request))
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, request_id_of(request))

    async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        request_id = request_id_of(request)
        log.error("unhandled error in %s %s (request %s)", request.method, request.url.path,
                  request_id, exc_info=exc)
        # Starlette runs this handler outside every middleware, so the request-id header the
        # middleware would add has to be set here (unless a proxy sets it).
        echo = getattr(request.state, "echo_request_id", False)
        headers = {REQUEST_ID_HEADER: request_id} if echo else None
        return error_response(500, "internal_error", "internal server error", request_id, headers)

    app.add_exception_handler(SealserveError, on_sealserve_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)


class RequestContextMiddleware:
    """Gives every request an id (echoed in ``X-Request-ID``) and guards request bodies.

    A client-supplied ``X-Request-ID`` is kept when it is short and plain, so a caller can trace
    its own ids; otherwise a new one is made. Behind Ray Serve's proxy (``proxy_sets_request_id``)
    the proxy has already chosen the id, put it in the request headers and will put it on the
    response, so the middleware only reads it. Bodies larger than ``max_body_bytes`` are refused
    with 413 — by Content-Length up front, and by counting for chunked bodies — and, with
    ``json_only``, a body that is not ``application/json`` is refused with 415.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        json_only: bool = True,
        proxy_sets_request_id: bool = False,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.json_only = json_only
        self.proxy_sets_request_id = proxy_sets_request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        supplied = headers.get(REQUEST_ID_HEADER, "")
        if self.proxy_sets_request_id:
            request_id = supplied or uuid.uuid4().hex
        else:
            request_id = supplied if _CLIENT_REQUEST_ID.match(supplied) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["echo_request_id"] = not self.proxy_sets_request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start" and not self.proxy_sets_request_id:
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        if scope["method"] in _BODY_METHODS:
            refusal = self._refusal(headers)
            if refusal is not None:
                await sealserve_error_response(refusal, request_id)(scope, receive, send_with_id)
                return
            receive = self._limited(receive)
        await self.app(scope, receive, send_with_id)

    def _refusal(self, headers: Headers) -> SealserveError | None:
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return BadRequestError("Content-Length is not a number")
        if length is not None and int(length) > self.max_body_bytes:
            return PayloadTooLargeError(f"request body exceeds {self.max_body_bytes} bytes")
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        has_body = length not in (None, "0") or "transfer-encoding" in headers
        if self.json_only and has_body and media_type != "application/json":
            return UnsupportedMediaTypeError(
                f"Content-Type must be application/json, not {media_type or 'missing'!r}"
            )
        return None

    def _limited(self, receive: Receive) -> Receive:
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise PayloadTooLargeError(f"request body exceeds {self.max_body_bytes} bytes")
            return message

        return limited_receive
