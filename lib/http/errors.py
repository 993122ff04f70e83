"""The error mapping shared by sealserve's two FastAPI apps (the ingress and the resource API).

``lib/http`` and ``lib/resource_api`` are the only packages of ``lib/`` that import
FastAPI/Starlette. This module holds no business logic, only the mapping of the one error
hierarchy to the one error body ``{"error": {"code", "message", "request_id"}}``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lib.errors import (
    BadRequestError,
    SealserveError,
    ValidationFailedError,
    code_for_status,
)
from lib.observability.logs import client_error_line

REQUEST_ID_HEADER = "X-Request-ID"


# Seconds a client is asked to wait before retrying a 503: Serve replaces a dead replica within a
# few seconds (health checks every few seconds, a start of a second or two on a warm node).
SERVICE_UNAVAILABLE_RETRY_AFTER_S = 2


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or "-")


def log_answer(log: logging.Logger, request: Request, status: int, code: str) -> None:
    """One line per error answer: status, code, request id, key id; never a traceback."""
    principal = getattr(request.scope.get("state", {}).get("admission"), "principal", None)
    line = client_error_line(status, code, request_id_of(request), getattr(principal, "subject", None))
    log.log(logging.ERROR if status >= 500 else logging.INFO, line)


def error_response(
    status_code: int, code: str, message: str, request_id: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    return JSONResponse(body, status_code=status_code, headers=headers)


def sealserve_error_response(exc: SealserveError, request_id: str) -> JSONResponse:
    headers = None
    if exc.status_code == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif exc.status_code == 503:
        # A dependency is away (a model replica being replaced, the database, a sealed model's
        # store): worth retrying soon, not at once.
        headers = {"Retry-After": str(SERVICE_UNAVAILABLE_RETRY_AFTER_S)}
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
        log_answer(log, request, exc.status_code, exc.code)
        return sealserve_error_response(exc, request_id_of(request))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, status = validation_message(exc)
        error = BadRequestError(message) if status == 400 else ValidationFailedError(message)
        log_answer(log, request, error.status_code, error.code)
        return sealserve_error_response(error, request_id_of(request))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        # FastAPI turns an error raised while reading the body (our size limit) into a 400.
        if isinstance(exc.__cause__, SealserveError):
            log_answer(log, request, exc.__cause__.status_code, exc.__cause__.code)
            return sealserve_error_response(exc.__cause__, request_id_of(request))
        code = code_for_status(exc.status_code)
        log_answer(log, request, exc.status_code, code)
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
