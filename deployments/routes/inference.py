"""Inference: ``POST /v1/infer`` (alias ``/infer``, text to image) and ``POST /v1/classify``.

``/v1/infer`` with ``Accept: text/event-stream`` streams the generation's progress
(``lib/http/sse.py``); ``previews`` asks for that many evenly spaced previews in it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from deployments.routes.deps import AdmittedClassify, AdmittedInfer, Models
from lib.accounts.compute import CLASSIFY_COST
from lib.http.errors import request_id_of
from lib.http.sse import EVENT_STREAM, EventStreamResponse, progress_events, wants_event_stream
from lib.schemas import ClassifyRequest, ClassifyResponse, InferRequest, InferResponse

router = APIRouter()

Previews = Annotated[
    int, Query(ge=0, le=10, description="Previews in a progress stream, evenly spaced (0-10).")
]
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {EVENT_STREAM: {}}, "description": "With `Accept: text/event-stream`: "
          "`progress` events, then one `result` (the JSON body) or `error` event."}
}


@router.post("/v1/infer", response_model=InferResponse, responses=STREAM_RESPONSE)
@router.post("/infer", response_model=InferResponse, responses=STREAM_RESPONSE)
async def infer(
    body: InferRequest, admission: AdmittedInfer, models: Models, request: Request, previews: Previews = 0
) -> InferResponse | Response:
    await admission.charge_generation(
        width=body.width, height=body.height, steps=body.num_inference_steps, images=body.num_images
    )
    if wants_event_stream(request.headers.get("accept")):
        items = await models.generate_stream(body, admission, previews)
        return EventStreamResponse(progress_events(items, request_id_of(request)))
    return await models.generate(body, admission)


@router.post("/v1/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, admission: AdmittedClassify, models: Models) -> ClassifyResponse:
    await admission.charge(CLASSIFY_COST)
    return await models.classify(body, admission)
