"""The streaming and OpenAI-compatible routes in process (deployments/routes/openai.py, the
progress stream of deployments/routes/inference.py), over the fakes of tests/unit/test_routes.py:
event order and shapes, the OpenAI error body for every refusal, the gate in front of both.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from lib.accounts.auth import bootstrap_subject
from lib.errors import GatewayTimeoutError, ModelUnavailableError
from lib.http.sse import wants_event_stream
from lib.schemas import InferRequest, InferResponse
from tests.unit.test_routes import ADMIN_KEY, Ingress, bearer, create_key, ingress
from tests.unit.test_routes_model_clients import MODEL, FakeHandle, admission, clients, streamed

__all__ = ["ingress"]  # the fixture, imported to be used here


def events(text: str) -> list[tuple[str | None, dict[str, Any]]]:
    """(event name, data) of each server-sent event."""
    found = []
    for block in text.strip().split("\n\n"):
        name, data = None, None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
        assert data is not None, block
        found.append((name, data))
    return found


def openai_error(response: Any, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == kind
    assert set(error) == {"message", "type", "code", "param", "request_id"}
    assert error["message"]
    return error


def test_accept_header_parsing() -> None:
    assert wants_event_stream("text/event-stream")
    assert wants_event_stream("application/json, text/event-stream;q=0.5")
    assert not wants_event_stream("text/event-stream;q=0")
    assert not wants_event_stream("*/*")
    assert not wants_event_stream(None)


def test_infer_streams_progress_then_the_result(ingress: Ingress) -> None:
    body = {"id": "r1", "model_id": MODEL, "prompt": "a cat", "num_images": 2}
    headers = {**bearer(), "Accept": "text/event-stream"}
    response = ingress.client.post("/v1/infer?previews=1", json=body, headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["X-RateLimit-Limit"] == "100"
    found = events(response.text)
    progress = [data for name, data in found if name == "progress"]
    assert [(p["step"], p["image_index"]) for p in progress] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert [p.get("preview") for p in progress] == ["preview-1-0", "preview-1-1", None, None]
    assert found[-1][0] == "result" and found[-1][1]["id"] == "r1"
    assert len(found[-1][1]["images"]) == 2
    # Without the header: the usual JSON body.
    plain = ingress.client.post("/v1/infer", json=body, headers=bearer())
    assert plain.status_code == 200 and plain.json()["id"] == "r1"


def test_infer_stream_refusals_are_plain_errors_before_the_stream(ingress: Ingress) -> None:
    headers = {"Accept": "text/event-stream"}
    body = {"id": "r1", "model_id": "nope", "prompt": "a cat"}
    assert ingress.client.post("/v1/infer", json=body, headers=headers).status_code == 401
    missing = ingress.client.post("/v1/infer", json=body, headers={**headers, **bearer()})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_an_error_in_the_stream_ends_it_with_an_error_event(ingress: Ingress) -> None:
    def failing(request: Any, previews: int = 0) -> Any:
        raise ModelUnavailableError("model tiny could not be loaded")

    ingress.text_to_image.methods["generate_stream"] = failing
    body = {"id": "r1", "model_id": MODEL, "prompt": "a cat"}
    response = ingress.client.post(
        "/v1/infer", json=body, headers={**bearer(), "Accept": "text/event-stream"}
    )
    [(name, data)] = events(response.text)
    assert name == "error"
    assert data["error"]["code"] == "model_unavailable" and data["error"]["request_id"]


def test_models_carry_the_openai_list_shape(ingress: Ingress) -> None:
    listed = ingress.client.get("/v1/models", headers=bearer()).json()
    assert listed["object"] == "list" and listed["count"] == 2
    assert [m["id"] for m in listed["data"]] == [m["id"] for m in listed["models"]]
    assert set(listed["data"][0]) >= {"id", "object", "created", "owned_by"}
    assert listed["data"][0]["object"] == "model" and listed["data"][0]["owned_by"] == "local"


def test_images_generations_answers_in_openai_shape(ingress: Ingress) -> None:
    body = {"prompt": "a cat", "n": 2, "size": "320x256", "seed": 5, "num_inference_steps": 3}
    response = ingress.client.post("/v1/images/generations", json=body, headers=bearer())
    assert response.status_code == 200, response.text
    answer = response.json()
    assert isinstance(answer["created"], int) and answer["size"] == "320x256"
    assert [d["b64_json"] for d in answer["data"]] == ["iVBO", "iVBO"]
    [(_, _, (sent,))] = [c for c in ingress.text_to_image.calls if c[0] == "generate"]
    assert (sent.model_id, sent.width, sent.height, sent.num_images, sent.seed) == (MODEL, 320, 256, 2, 5)
    assert sent.num_inference_steps == 3
    assert ingress.usage(bootstrap_subject(ADMIN_KEY)) == [("POST /v1/images/generations", 1)]


def test_images_generations_streams_partial_then_completed_images(ingress: Ingress) -> None:
    body = {"prompt": "a cat", "n": 2, "stream": True, "partial_images": 2}
    response = ingress.client.post("/v1/images/generations", json=body, headers=bearer())
    assert response.status_code == 200
    found = events(response.text)
    kinds = [name for name, _ in found]
    assert kinds == ["image_generation.partial_image"] * 4 + ["image_generation.completed"] * 2
    partial = [data for _, data in found[:4]]
    assert [(p["partial_image_index"], p["image_index"]) for p in partial] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(p["type"] == "image_generation.partial_image" and p["size"] == "512x512" for p in partial)
    completed = found[-1][1]
    assert completed["type"] == "image_generation.completed" and completed["usage"]["total_tokens"] == 0
    assert {"b64_json", "background", "created_at", "output_format", "quality", "size"} <= set(completed)


def test_images_generations_errors_are_openai_shaped(ingress: Ingress) -> None:
    post = ingress.client.post
    openai_error(post("/v1/images/generations", json={"prompt": "a cat"}), 401, "authentication_error")
    wrong = post("/v1/images/generations", json={"prompt": "a cat"}, headers=bearer("ss_wrong"))
    assert wrong.headers["WWW-Authenticate"] == "Bearer"
    openai_error(wrong, 401, "authentication_error")
    unknown = post("/v1/images/generations", json={"prompt": "a cat", "model": "dall-e-3"}, headers=bearer())
    assert openai_error(unknown, 404, "invalid_request_error")["code"] == "model_not_found"
    size = post("/v1/images/generations", json={"prompt": "a cat", "size": "1000x7"}, headers=bearer())
    assert openai_error(size, 422, "invalid_request_error")["param"] == "size"
    url = post("/v1/images/generations", json={"prompt": "a", "response_format": "url"}, headers=bearer())
    assert "b64_json" in openai_error(url, 400, "invalid_request_error")["message"]
    bad_json = post(
        "/v1/images/generations", content=b"{", headers={**bearer(), "Content-Type": "application/json"}
    )
    openai_error(bad_json, 400, "invalid_request_error")
    typo = post("/v1/images/generations", json={"prompt": "a", "sizes": "512x512"}, headers=bearer())
    assert openai_error(typo, 422, "invalid_request_error")["param"] == "sizes"
    ignored = {"prompt": "a", "quality": "hd", "style": "vivid", "user": "u1", "size": "auto"}
    assert post("/v1/images/generations", json=ignored, headers=bearer()).status_code == 200


def test_images_generations_needs_the_infer_scope_and_counts_against_the_limit(ingress: Ingress) -> None:
    classify_only = create_key(ingress, ["classify"])
    refused = ingress.client.post(
        "/v1/images/generations", json={"prompt": "a"}, headers=bearer(classify_only["key"])
    )
    openai_error(refused, 403, "permission_error")
    limited = create_key(ingress, ["infer"], rate_limit="1/minute")
    first = ingress.client.post(
        "/v1/images/generations", json={"prompt": "a"}, headers=bearer(limited["key"])
    )
    assert first.status_code == 200
    second = ingress.client.post(
        "/v1/images/generations", json={"prompt": "a"}, headers=bearer(limited["key"])
    )
    openai_error(second, 429, "rate_limit_error")
    assert int(second.headers["Retry-After"]) > 0


def test_images_generations_authenticates_before_it_reads_the_fields(ingress: Ingress) -> None:
    bad = {"prompt": "", "size": "7x7", "n": 99}
    openai_error(ingress.client.post("/v1/images/generations", json=bad), 401, "authentication_error")


def test_a_stream_that_outlives_the_timeout_is_504_and_its_call_is_cancelled() -> None:
    slow = FakeHandle({"generate_stream": streamed}, delay_s=5.0)
    request = InferRequest(id="r", model_id=MODEL, prompt="a cat")

    async def consume() -> None:
        items = await clients(t2i=slow, timeout_s=0.05).generate_stream(request, admission())
        async for _ in items:
            pass

    with pytest.raises(GatewayTimeoutError):
        asyncio.run(consume())
    assert slow.streams[0].cancelled


def test_leaving_a_stream_early_cancels_its_call_and_a_finished_one_is_left_alone() -> None:
    t2i = FakeHandle({"generate_stream": streamed})
    request = InferRequest(id="r", model_id=MODEL, prompt="a cat", num_images=2)

    async def scenario() -> list[Any]:
        models = clients(t2i=t2i)
        early = await models.generate_stream(request, admission())
        await anext(early)
        await early.aclose()  # type: ignore[attr-defined]
        seen = admission()
        full = [item async for item in await models.generate_stream(request, seen)]
        assert seen.image_count == 2 and seen.model_id == MODEL
        return full

    full = asyncio.run(scenario())
    assert isinstance(full[-1], InferResponse) and len(full) == 3
    assert [stream.cancelled for stream in t2i.streams] == [True, False]
