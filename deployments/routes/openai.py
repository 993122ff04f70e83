"""The OpenAI-compatible Images API: ``POST /v1/images/generations`` (``infer`` scope).

The same gate as ``/v1/infer`` (the ingress's middleware, then the ``infer`` admission: the same
keys, JWTs, rate limits and usage records), the same model clients, the same cancellation: a
client that hangs up stops the generation. Every error of these routes, the gate's included,
leaves in OpenAI's error shape (``lib/openai_api/events.py``), which the ``openai`` client turns
into its exception classes; the request and response translation is in ``lib/openai_api/``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.routes.deps import AdmittedInfer, Models
from lib.errors import SealserveError, code_for_status
from lib.http.errors import request_id_of, validation_message
from lib.http.sse import EVENT_STREAM, EventStreamResponse, sse
from lib.openai_api.events import error_body, error_of, image_events
from lib.openai_api.schemas import ImageGenerationRequest, ImagesResponse, images_response

log = logging.getLogger("ray.serve")


def openai_error_response(exc: Exception, request: Request) -> JSONResponse:
    """Any error of these routes as OpenAI's error body, with the status the client maps."""
    request_id = request_id_of(request)
    if isinstance(exc, RequestValidationError):
        message, status = validation_message(exc)
        errors = exc.errors()
        location = [str(p) for p in errors[0].get("loc", ()) if p != "body"] if errors else []
        code = "bad_request" if status == 400 else "validation_error"
        body = error_body(status, code, message, request_id, ".".join(location) or None)
    elif isinstance(exc, StarletteHTTPException) and not isinstance(exc.__cause__, SealserveError):
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else code_for_status(status)
        body = error_body(status, code_for_status(status), message, request_id)
    else:
        cause = exc.__cause__ if isinstance(exc, StarletteHTTPException) else exc
        if not isinstance(cause, SealserveError) or cause.status_code == 500:
            log.error("unhandled error in %s (request %s)", request.url.path, request_id, exc_info=exc)
        status, body = error_of(cause or exc, request_id)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


class OpenAIRoute(APIRoute):
    """A route whose every error (dependencies and validation included) is OpenAI-shaped."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return openai_error_response(exc, request)

        return handle


router = APIRouter(route_class=OpenAIRoute)
# Every route of this family answers errors in OpenAI's shape, the body gate's refusals included.
OPENAI_PATH_PREFIX = "/v1/images/"
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {EVENT_STREAM: {}}, "description": "With `stream: true`: "
          "`image_generation.partial_image` events, then `image_generation.completed` per image."}
}


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    responses=STREAM_RESPONSE,
    summary="Generate images (OpenAI Images API)",
)
async def generate_images(
    body: ImageGenerationRequest, admission: AdmittedInfer, models: Models, request: Request
) -> ImagesResponse | Response:
    request_id = request_id_of(request)
    info = await models.resolve_text_to_image(body.model)
    native = body.to_infer_request(request_id, info.id)
    await admission.charge_generation(
        width=native.width, height=native.height, steps=native.num_inference_steps, images=native.num_images
    )
    if not body.stream:
        return images_response(await models.generate(native, admission))
    items = await models.generate_stream(native, admission, body.partial_images or 0)
    events = image_events(items, size=f"{native.width}x{native.height}", request_id=request_id)
    return EventStreamResponse(_encoded(events))


async def _encoded(events: AsyncIterator[tuple[str, dict[str, Any]]]) -> AsyncIterator[bytes]:
    try:
        async for name, data in events:
            yield sse(data, name)
    finally:
        await events.aclose()  # type: ignore[attr-defined]
