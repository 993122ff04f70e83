"""The request-context middleware: a request id for every request, and guarded request bodies."""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import Headers, MutableHeaders

from lib.errors import BadRequestError, PayloadTooLargeError, SealserveError, UnsupportedMediaTypeError
from lib.http.asgi import ASGIApp, AsgiScope, Message, Receive, Send
from lib.http.errors import REQUEST_ID_HEADER, sealserve_error_response

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class RequestContextMiddleware:
    """Gives every request an id (echoed in ``X-Request-ID``) and guards request bodies.

    A client-supplied ``X-Request-ID`` is kept when it is short and plain, so a caller can trace
    its own ids; otherwise a new one is made. Behind Ray Serve's proxy (``proxy_sets_request_id``)
    the proxy has already chosen the id (keeping a client's as sent), put it in the request
    headers and will put it on the response, so the middleware only reads it, and replaces one
    that is not plain for its own use (error bodies, logs, usage); the proxy's response header is
    the proxy's. Bodies larger than ``max_body_bytes`` are refused
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

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        supplied = headers.get(REQUEST_ID_HEADER, "")
        # Behind the proxy the id may still be the client's, passed through as sent: only a plain
        # one reaches error bodies, logs and usage records.
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
            receive = limited_receive(receive, self.max_body_bytes)
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


def limited_receive(receive: Receive, limit: int, *, per_route: bool = False) -> Receive:
    """``receive``, raising :class:`PayloadTooLargeError` (413) once the body passes ``limit`` bytes.

    The one body cap enforced while streaming: the global cap here, the per-route caps of the
    ingress's body gate and of the resource API's guard (``per_route`` says so in the message).
    """
    received = 0
    message_text = f"request body exceeds {limit} bytes" + (" for this route" if per_route else "")

    async def limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLargeError(message_text)
        return message

    return limited
