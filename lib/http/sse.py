"""Server-sent events: the ``text/event-stream`` responses of ``POST /v1/infer`` (progress) and of
``POST /v1/images/generations`` with ``stream: true``.

An event is ``event: <name>`` and one ``data:`` line of JSON. An error after the response has
started cannot change the status any more: it becomes an ``error`` event carrying the usual
error body, and the stream ends. Leaving the stream early (the client hung up) closes the
iterator it was made from, which cancels the work behind it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse

from lib.errors import SealserveError
from lib.schemas import GenerationStep, InferResponse, ProgressEvent

EVENT_STREAM = "text/event-stream"
log = logging.getLogger(__name__)


def wants_event_stream(accept: str | None) -> bool:
    """Whether an ``Accept`` header names ``text/event-stream`` (with a quality above 0)."""
    for part in (accept or "").split(","):
        media, *params = (p.strip().lower() for p in part.split(";"))
        if media == EVENT_STREAM and not any(_is_zero_quality(p) for p in params):
            return True
    return False


def _is_zero_quality(param: str) -> bool:
    name, _, value = param.partition("=")
    try:
        return name.strip() == "q" and float(value) == 0.0
    except ValueError:
        return False


def sse(data: Any, event: str | None = None) -> bytes:
    """One event: an optional ``event:`` line and one ``data:`` line of compact JSON."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def error_data(exc: BaseException, request_id: str) -> tuple[int, dict[str, Any]]:
    """The status and documented error body of an error raised while streaming."""
    if isinstance(exc, SealserveError) and exc.status_code != 500:
        status, code, message = exc.status_code, exc.code, exc.message
    else:
        log.error("unhandled error in an event stream (request %s)", request_id, exc_info=exc)
        status, code, message = 500, "internal_error", "internal server error"
    return status, {"error": {"code": code, "message": message, "request_id": request_id}}


async def progress_events(
    items: AsyncIterator[GenerationStep | InferResponse], request_id: str
) -> AsyncIterator[bytes]:
    """The native stream: ``progress`` events (one per image per step), then ``result`` or ``error``."""
    try:
        async for item in items:
            if isinstance(item, InferResponse):
                yield sse(item.model_dump(mode="json"), "result")
                continue
            for index in range(item.num_images):
                preview = item.previews[index] if item.previews and index < len(item.previews) else None
                event = ProgressEvent(
                    step=item.step, total_steps=item.total_steps, image_index=index, preview=preview
                )
                yield sse(event.model_dump(mode="json", exclude_none=True), "progress")
    except Exception as exc:
        yield sse(error_data(exc, request_id)[1], "error")
    finally:
        await _close(items)


async def _close(items: AsyncIterator[Any]) -> None:
    close = getattr(items, "aclose", None)
    if close is not None:
        await close()


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that no proxy buffers or caches."""

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(
            content,
            media_type=EVENT_STREAM,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
