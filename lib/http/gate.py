"""ASGI middleware: authentication before the body, per-route body caps, and the rate-limit headers
and usage record of every admitted request.

:class:`BodyGateMiddleware` runs first for a request that carries a body (POST, PUT, PATCH): it
authenticates the ``Authorization`` header before a byte of the body is read (an anonymous or
badly authenticated request is answered 401 at once, whatever it was about to send), then caps
the body by its route (:func:`body_limit_for`), by Content-Length up front and by counting while
it streams (413). The principal it found is kept in the request state, so the route's admission
(``deployments/routes/deps.py``) does not authenticate twice.

The route's auth dependency stores its :class:`lib.accounts.gate.Admission` in the request state
(:func:`attach_admission`); from then on this middleware adds the admission's ``X-RateLimit-*`` /
``Retry-After`` headers to the response, whatever produced it (the route, or an error handler
answering a 403, 422, 429, 504 ...), and hands a usage record to ``record``
(``UsageRecorder.record``: a journal append and a queue append, never a database call) *before*
the response's first message goes out, so that a response a client received was recorded on the
node (``lib/accounts/journal.py``); its latency is the time to that first message. A request that never
got past authentication has no admission and is neither decorated nor recorded.

Written against the ASGI spec alone (no Starlette import). The ingress wraps this middleware
around its whole stack (``deployments/ingress.py``, ``IngressApi``), so the last-resort 500 passes
through it and gets the headers too. Inside a stack, an unhandled exception leaves it before any
response is sent: it is recorded as a 500 (once the request is over) and re-raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.routing import Match

from lib.accounts.auth import Principal
from lib.accounts.gate import Admission, usage_record
from lib.accounts.records import UsageRecord
from lib.errors import BadRequestError, PayloadTooLargeError, SealserveError
from lib.http.asgi import ASGIApp, AsgiScope, Message, Receive, Send
from lib.http.context import limited_receive
from lib.http.errors import sealserve_error_response
from lib.observability import metrics

ADMISSION_STATE_KEY = "admission"
PRINCIPAL_STATE_KEY = "principal"
# The body cap of every route but the image routes: an inference request, a token exchange or an
# admin call is a few hundred bytes of JSON (a 1000-character prompt, twice, is 2 KB escaped at
# worst 12 KB); 64 KiB leaves room without letting a body weigh on the ingress's memory.
SMALL_BODY_BYTES = 64 * 1024
# Routes whose body carries an image, capped by the configured image size instead.
IMAGE_BODY_PATHS = frozenset({"/v1/classify"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Where an admitted request's time went (auth, limit, model, app), for clients and benchmarks.
SERVER_TIMING_HEADER = "Server-Timing"

log = logging.getLogger(__name__)


def body_limit_for(path: str, *, image_bytes: int) -> int:
    """The most bytes a request body to ``path`` may have."""
    return image_bytes if path.rstrip("/") in IMAGE_BODY_PATHS else min(SMALL_BODY_BYTES, image_bytes)


def principal_of(scope: AsgiScope) -> Principal | None:
    found = scope.get("state", {}).get(PRINCIPAL_STATE_KEY)
    return found if isinstance(found, Principal) else None


def _documented_error(exc: SealserveError, scope: AsgiScope, request_id: str) -> ASGIApp:
    return sealserve_error_response(exc, request_id)


class BodyGateMiddleware:
    """Authentication before the body, and the body's cap by route (see the module docstring).

    Sits inside the request-context middleware (whose request id the errors carry, and whose
    global cap answers first) and outside the routes. ``authenticate`` is
    ``RequestGate.authenticate``; ``body_limit(path)`` the cap of a route; ``error_answer`` the
    response to a refusal (by default the documented error body; a route family with a shape of
    its own, like OpenAI's, passes its own).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticate: Callable[[str | None], Awaitable[Principal]],
        body_limit: Callable[[str], int],
        error_answer: Callable[[SealserveError, AsgiScope, str], ASGIApp] | None = None,
    ) -> None:
        self.app = app
        self._authenticate = authenticate
        self._body_limit = body_limit
        self._error_answer = error_answer or _documented_error

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {bytes(name).lower(): bytes(value) for name, value in scope.get("headers", [])}
        limit = self._body_limit(str(scope.get("path", "")))
        try:
            authorization = headers.get(b"authorization")
            principal = await self._authenticate(authorization.decode("latin-1") if authorization else None)
            length = headers.get(b"content-length")
            if length is not None and not length.isdigit():
                raise BadRequestError("Content-Length is not a number")
            if length is not None and int(length) > limit:
                raise PayloadTooLargeError(f"request body exceeds {limit} bytes for this route")
        except SealserveError as exc:
            request_id = str(scope.get("state", {}).get("request_id") or "-")
            # Answered before routing: name the route as the router would, for the request count.
            scope.setdefault("route", matched_route(scope))
            await self._error_answer(exc, scope, request_id)(scope, receive, send)
            return
        scope.setdefault("state", {})[PRINCIPAL_STATE_KEY] = principal
        await self.app(scope, limited_receive(receive, limit, per_route=True), send)


def attach_admission(scope: AsgiScope, admission: Admission) -> None:
    scope.setdefault("state", {})[ADMISSION_STATE_KEY] = admission


def admission_of(scope: AsgiScope) -> Admission | None:
    found = scope.get("state", {}).get(ADMISSION_STATE_KEY)
    return found if isinstance(found, Admission) else None


def matched_route(scope: AsgiScope) -> object | None:
    """The route of ``scope["app"]`` (Starlette puts the app in the scope) matching the request."""
    return _match(getattr(getattr(scope.get("app"), "router", None), "routes", ()), scope)


def _match(routes: Any, scope: AsgiScope) -> object | None:
    for route in routes:
        # FastAPI (0.137+) keeps an included router as one node and resolves its routes per request.
        included = getattr(route, "original_router", None)
        found = _match(included.routes, scope) if included is not None else None
        if found is None and included is None and route.matches(scope)[0] == Match.FULL:
            found = route
        if found is not None:
            return found
    return None


def endpoint_of(scope: AsgiScope) -> str:
    """``METHOD /route/{template}``: the matched route's template, so ids in paths do not become
    endpoints of their own (FastAPI puts the matched route in the scope)."""
    route_path = getattr(scope.get("route"), "path", None)
    return f"{scope.get('method', '?')} {route_path or 'unmatched'}"


class GateMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        record: Callable[[UsageRecord], object],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.app = app
        self._record = record
        self._clock = clock

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = self._clock()
        # Server-Timing reports real elapsed time, whatever clock the usage record is given.
        started_perf = time.perf_counter()
        recorded = False
        status: int | None = None

        async def send_with_rate_headers(message: Message) -> None:
            nonlocal recorded, status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                admission = admission_of(scope)
                if admission is not None:
                    recorded = True
                    self._record_usage(scope, admission, status, started)
                    extra = admission.headers()
                    extra[SERVER_TIMING_HEADER] = admission.server_timing(
                        (time.perf_counter() - started_perf) * 1000
                    )
                    message["headers"] = with_headers(message.get("headers", []), extra)
            await send(message)

        try:
            await self.app(scope, receive, send_with_rate_headers)
        finally:
            metrics.request(endpoint_of(scope), status or 500)
            admission = admission_of(scope)
            if admission is not None:
                # The request is over (its stream too, or the client went away): a concurrency
                # slot it held is given back (lib/accounts/compute.py).
                admission.release()
                if not recorded:  # no response went out
                    self._record_usage(scope, admission, 500, started)

    def _record_usage(self, scope: AsgiScope, admission: Admission, status: int, started: float) -> None:
        try:
            self._record(
                usage_record(
                    admission,
                    endpoint=endpoint_of(scope),
                    status_code=status,
                    latency_ms=(self._clock() - started) * 1000.0,
                )
            )
        except Exception:  # accounting must never turn an answered request into an error
            log.exception("could not record usage for %s", endpoint_of(scope))


def with_headers(raw: Any, extra: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """ASGI raw headers plus ``extra``, leaving any header the response already set untouched."""
    headers = [(bytes(name), bytes(value)) for name, value in raw]
    present = {name.lower() for name, _ in headers}
    for name, value in extra.items():
        encoded = name.lower().encode("latin-1")
        if encoded not in present:
            headers.append((encoded, value.encode("latin-1")))
    return headers
