"""The resource API's request guard: authentication and a per-route body cap before any body is read.

FastAPI reads and parses a request body before it runs the route's dependencies, so without this
an anonymous client could make the server buffer and parse up to the global body limit. This ASGI
middleware runs first: a route that needs a login gets its bearer token's signature and expiry
checked from the headers alone (the route's dependency then looks the user up), and every route
has its own body cap (a key release is a few hundred bytes; only an upload is large), enforced
by ``Content-Length`` up front and by counting for a streamed body.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers

from lib.errors import PayloadTooLargeError, SealserveError
from lib.http.asgi import ASGIApp, AsgiScope, Receive, Send
from lib.http.context import limited_receive
from lib.http.errors import sealserve_error_response

SMALL_BODY = 4 * 1024
CDN_BODY = 16 * 1024
# Routes that need no login; everything else under these prefixes does.
_PUBLIC = frozenset({"/login", "/health"})
_AUTHENTICATED_PREFIXES = ("/resources/", "/cdn", "/stats/", "/nodes/")


def body_cap(method: str, path: str, upload_cap: int) -> int:
    """The largest body ``method path`` accepts."""
    if method == "POST" and path.startswith("/resources/") and not path.startswith("/resources/get/"):
        return upload_cap
    if method == "PUT" and path == "/cdn":
        return CDN_BODY
    return SMALL_BODY


class ResourceGuard:
    """Checks ``check_token(authorization header)`` and the route's body cap before the app runs."""

    def __init__(self, app: ASGIApp, *, check_token: Callable[[str | None], object], upload_cap: int) -> None:
        self.app = app
        self.check_token = check_token
        self.upload_cap = upload_cap

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = str(scope["method"]), str(scope["path"])
        headers = Headers(scope=scope)
        cap = body_cap(method, path, self.upload_cap)
        try:
            if path not in _PUBLIC and path.startswith(_AUTHENTICATED_PREFIXES):
                self.check_token(headers.get("authorization"))
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > cap:
                raise PayloadTooLargeError(f"request body exceeds {cap} bytes for this route")
        except SealserveError as exc:
            request_id = str(scope.get("state", {}).get("request_id", "-"))
            await sealserve_error_response(exc, request_id)(scope, receive, send)
            return
        await self.app(scope, limited_receive(receive, cap, per_route=True), send)


