"""The stream of ``POST /v1/images/generations`` with ``stream: true``, and the OpenAI error body.

Events are what the ``openai`` client's ``ImageGenStreamEvent`` types require: an
``image_generation.partial_image`` event per image at each of ``partial_images`` evenly spaced
denoising steps (a preview of the latents; ``partial_image_index`` counts the previews of an image
from 0), then one ``image_generation.completed`` event per image. Each also carries sealserve's
``image_index``. Each event is an SSE ``event:`` line named as its ``type`` and a ``data:`` line
of JSON; an error ends the stream with an ``error`` event whose data is the error body, which the
client raises as an ``APIError``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from lib.errors import SealserveError
from lib.schemas import GenerationStep, InferResponse

PARTIAL = "image_generation.partial_image"
COMPLETED = "image_generation.completed"
log = logging.getLogger(__name__)

# OpenAI's error ``type`` per status (what its API answers, so clients that branch on it work).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(
    status: int, code: str, message: str, request_id: str, param: str | None = None
) -> dict[str, Any]:
    """``{"error": {message, type, code, param, request_id}}``: the shape the client parses."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {
        "error": {"message": message, "type": kind, "code": code, "param": param, "request_id": request_id}
    }


def error_of(exc: BaseException, request_id: str) -> tuple[int, dict[str, Any]]:
    """Status and body of an error; a 500's message says nothing about internals."""
    if isinstance(exc, SealserveError) and exc.status_code != 500:
        return exc.status_code, error_body(exc.status_code, exc.code, exc.message, request_id)
    return 500, error_body(500, "internal_error", "internal server error", request_id)


def _common(size: str, created_at: int) -> dict[str, Any]:
    return {
        "background": "opaque",
        "created_at": created_at,
        "output_format": "png",
        "quality": "auto",
        "size": size,
    }


def _usage() -> dict[str, Any]:
    # Required by the client's completed event; tokens do not measure a diffusion model.
    return {
        "input_tokens": 0,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
        "output_tokens": 0,
        "total_tokens": 0,
    }


async def image_events(
    items: AsyncIterator[GenerationStep | InferResponse],
    *,
    size: str,
    request_id: str,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event name, data) for each event of the stream, the error event included."""
    partials = 0
    try:
        async for item in items:
            now = int(clock())
            if isinstance(item, InferResponse):
                for index, image in enumerate(item.images):
                    completed = {
                        "type": COMPLETED, "b64_json": image.base64, "image_index": index,
                        "seed": image.seed, "usage": _usage(),
                        **_common(f"{image.width}x{image.height}", now),
                    }
                    yield COMPLETED, completed
                continue
            if not item.previews:
                continue
            for index, preview in enumerate(item.previews):
                partial = {
                    "type": PARTIAL, "b64_json": preview, "partial_image_index": partials,
                    "image_index": index, **_common(size, now),
                }
                yield PARTIAL, partial
            partials += 1
    except Exception as exc:
        if not isinstance(exc, SealserveError) or exc.status_code == 500:
            log.error("unhandled error in an image stream (request %s)", request_id, exc_info=exc)
        yield "error", error_of(exc, request_id)[1]
    finally:
        close = getattr(items, "aclose", None)
        if close is not None:
            await close()
