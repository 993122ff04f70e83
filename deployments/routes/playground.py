"""The playground: ``GET /playground`` and its script and stylesheet (no auth to load the page).

Plain HTML and JavaScript from ``deployments/playground/``, no build step and no third-party
code. The page calls the API with the key the user pastes, which it keeps in the tab's session
storage only. A strict Content-Security-Policy allows this origin's script, style and API calls,
and images from ``data:`` (previews) and ``blob:`` (results) URLs; nothing inline, no frames.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

router = APIRouter(include_in_schema=False)

PLAYGROUND_DIR = Path(__file__).resolve().parents[1] / "playground"
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "form-action 'none'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
FILES = {
    "index.html": "text/html; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}


@cache
def _read(name: str) -> bytes:
    return (PLAYGROUND_DIR / name).read_bytes()


def _file(name: str) -> Response:
    return Response(_read(name), media_type=FILES[name], headers=SECURITY_HEADERS)


@router.get("/playground")
async def page() -> Response:
    return _file("index.html")


@router.get("/playground/playground.js")
async def script() -> Response:
    return _file("playground.js")


@router.get("/playground/playground.css")
async def stylesheet() -> Response:
    return _file("playground.css")
