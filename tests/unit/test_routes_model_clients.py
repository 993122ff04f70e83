"""ModelClients (deployments/model_clients.py) and MultiplexedHandles (deployments/handles.py), with
fake deployment handles: timeouts, Ray failures, unwrapped errors, health, configured handles made once.

The fakes here are also what tests/unit/test_routes.py serves its routes with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import Any

import pytest
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from deployments.handles import MultiplexedHandles, result_within
from deployments.model_clients import ModelClients
from lib.accounts.auth import Principal
from lib.accounts.gate import Admission
from lib.errors import (
    GatewayTimeoutError,
    InvalidImageError,
    ModelNotFoundError,
    ServiceUnavailableError,
    WrongModelKindError,
)
from lib.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    DeploymentHealth,
    GeneratedImage,
    GenerationStep,
    InferRequest,
    InferResponse,
    ModelInfo,
    Prediction,
)

MODEL = "a" * 64
CLASSIFIER = "c" * 64


class FakeResponse:
    """A DeploymentResponse: awaitable once, cancellable; ``outcome`` runs when awaited."""

    def __init__(self, outcome: Callable[[], Any], delay_s: float = 0.0) -> None:
        self.outcome = outcome
        self.delay_s = delay_s
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __await__(self) -> Generator[Any, None, Any]:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        await asyncio.sleep(self.delay_s)
        return self.outcome()


class FakeStream:
    """A DeploymentResponseGenerator: async-iterable over what ``outcome`` returns, cancellable."""

    def __init__(self, outcome: Callable[[], Any], delay_s: float = 0.0) -> None:
        self.outcome = outcome
        self.delay_s = delay_s
        self.cancelled = False
        self._items: Any = None

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:
        await asyncio.sleep(self.delay_s)
        if self._items is None:
            self._items = iter(self.outcome())
        try:
            return next(self._items)
        except StopIteration:
            raise StopAsyncIteration from None


class FakeMethod:
    def __init__(self, handle: FakeHandle, name: str) -> None:
        self.handle = handle
        self.name = name

    def remote(self, *args: Any) -> FakeResponse | FakeStream:
        root = self.handle.root
        root.calls.append((self.name, self.handle.model_id, args))
        behaviour = root.methods[self.name]
        if self.handle.stream:
            stream = FakeStream(lambda: behaviour(*args), root.delay_s)
            root.streams.append(stream)
            return stream
        response = FakeResponse(lambda: behaviour(*args), root.delay_s)
        root.responses.append(response)
        return response


class FakeHandle:
    """A DeploymentHandle whose methods are plain functions (raise to fail); ``options`` is counted."""

    def __init__(self, methods: dict[str, Callable[..., Any]], *, delay_s: float = 0.0) -> None:
        self.methods = methods
        self.delay_s = delay_s
        self.model_id: str | None = None
        self.stream = False
        self.root = self
        self.calls: list[tuple[str, str | None, tuple[Any, ...]]] = []
        self.responses: list[FakeResponse] = []
        self.streams: list[FakeStream] = []
        self.options_calls: list[str] = []

    def options(self, *, multiplexed_model_id: str | None = None, stream: bool | None = None) -> FakeHandle:
        if multiplexed_model_id is not None:
            self.root.options_calls.append(multiplexed_model_id)
        configured = FakeHandle(self.methods)
        configured.root = self.root
        configured.model_id = multiplexed_model_id if multiplexed_model_id is not None else self.model_id
        configured.stream = self.stream if stream is None else stream
        return configured

    def __getattr__(self, name: str) -> FakeMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return FakeMethod(self, name)


class FakeLoader:
    """NodeLoader's side the ingress uses: models(), call("get" | "errors")."""

    def __init__(self, models: list[ModelInfo] | None = None, errors: dict[str, str] | None = None) -> None:
        self.catalog = models if models is not None else [
            model_info(MODEL, "text-to-image"), model_info(CLASSIFIER, "image-classification"),
        ]
        self.models_calls = 0
        self.errors = errors or {}
        self.fail: BaseException | None = None

    async def models(self) -> list[ModelInfo]:
        self.models_calls += 1
        if self.fail is not None:
            raise self.fail
        return list(self.catalog)

    async def call(self, method: str, *args: Any) -> Any:
        if self.fail is not None:
            raise self.fail
        if method == "errors":
            return dict(self.errors)
        if method == "get":
            for info in self.catalog:
                if info.id == args[0]:
                    return info
            raise ModelNotFoundError(f"no model {args[0][:40]!r}")
        raise AssertionError(f"unexpected loader call {method}")


def model_info(model_id: str, kind: str, name: str | None = None) -> ModelInfo:
    return ModelInfo(
        id=model_id, name=name or f"model-{model_id[:4]}", size=1, path="/m", extension="", kind=kind,
        status="available",
    )


def generated(request: InferRequest) -> InferResponse:
    images = [
        GeneratedImage(base64="iVBO", seed=i, width=request.width, height=request.height)
        for i in range(request.num_images)
    ]
    return InferResponse(
        id=request.id, model_id=request.model_id, images=images, processing_time=0.1, prompt=request.prompt,
        negative_prompt=None, num_inference_steps=2, guidance_scale=7.5,
    )


def streamed(request: InferRequest, previews: int = 0) -> list[GenerationStep | InferResponse]:
    """Two steps (previews on the steps asked for, up to two), then the response."""
    steps: list[GenerationStep | InferResponse] = [
        GenerationStep(
            step=step, total_steps=2, num_images=request.num_images,
            previews=[f"preview-{step}-{i}" for i in range(request.num_images)] if step <= previews else None,
        )
        for step in (1, 2)
    ]
    return [*steps, generated(request)]


def classified(request: ClassifyRequest) -> ClassifyResponse:
    return ClassifyResponse(predictions=[Prediction(label="cat", confidence=0.9)], model=CLASSIFIER)


def healthy(name: str) -> Callable[[], DeploymentHealth]:
    return lambda: DeploymentHealth(deployment=name, device="cpu", dtype="float32", loaded_models=[])


def text_to_image(**overrides: Callable[..., Any]) -> FakeHandle:
    return FakeHandle(
        {"generate": generated, "generate_stream": streamed, "health": healthy("TextToImage"), **overrides}
    )


def classified_many(requests: list[ClassifyRequest]) -> list[ClassifyResponse]:
    return [classified(request) for request in requests]


def classifier(**overrides: Callable[..., Any]) -> FakeHandle:
    return FakeHandle(
        {"classify_many": classified_many, "health": healthy("ImageClassifier"), **overrides}
    )


def clients(
    t2i: FakeHandle | None = None,
    clf: FakeHandle | None = None,
    loader: FakeLoader | None = None,
    **kwargs: Any,
) -> ModelClients:
    return ModelClients(
        t2i or text_to_image(), clf or classifier(), loader or FakeLoader(),  # type: ignore[arg-type]
        timeout_s=kwargs.pop("timeout_s", 2.0), **kwargs,
    )


def admission() -> Admission:
    return Admission(Principal("k1", frozenset({"infer", "classify"}), "api_key", None), None)


def infer_request(model_id: str = MODEL, **fields: Any) -> InferRequest:
    return InferRequest(id="r1", model_id=model_id, prompt="a cat", **fields)


def raising(exc: BaseException) -> Callable[..., Any]:
    def fail(*_args: Any) -> Any:
        raise exc

    return fail


# --- generate / classify --------------------------------------------------------------------------


def test_generate_calls_the_handle_for_its_model_and_fills_the_usage() -> None:
    t2i = text_to_image()
    used = admission()
    result = asyncio.run(clients(t2i).generate(infer_request(num_images=2), used))
    assert [image.seed for image in result.images] == [0, 1]
    [(method, model_id, (sent,))] = t2i.calls
    assert (method, model_id, sent.prompt) == ("generate", MODEL, "a cat")
    assert (used.model_id, used.image_count) == (MODEL, 2)


def test_classify_resolves_the_model_routes_by_its_id_and_records_the_model_that_did_it() -> None:
    clf = classifier()
    used = admission()
    result = asyncio.run(clients(clf=clf).classify(ClassifyRequest(image="aGk="), used))
    assert result.model == CLASSIFIER
    [(method, model_id, (sent,))] = clf.calls
    assert (method, model_id, [r.model_id for r in sent]) == ("classify_many", CLASSIFIER, [CLASSIFIER])
    assert clf.options_calls == [CLASSIFIER]  # the default model, routed by its id
    assert (used.model_id, used.image_count) == (CLASSIFIER, 1)
    resnet = "r" * 64
    loader = FakeLoader([model_info(resnet, "image-classification", name="resnet")])
    by_name = asyncio.run(
        clients(clf=clf, loader=loader).classify(
            ClassifyRequest(image="aGk=", model_id="resnet"), admission()
        )
    )
    assert clf.calls[-1][1] == resnet and by_name.model == CLASSIFIER  # the fake answers as CLASSIFIER


def test_concurrent_classify_requests_travel_in_one_call_per_model() -> None:
    clf = classifier()
    models = clients(clf=clf)

    async def burst() -> list[ClassifyResponse]:
        first = await models.classify(ClassifyRequest(image="aGk="), admission())  # fills the catalog
        rest = await asyncio.gather(
            *(models.classify(ClassifyRequest(image="aGk="), admission()) for _ in range(10))
        )
        return [first, *rest]

    assert len(asyncio.run(burst())) == 11
    assert len(clf.calls[0][2][0]) == 1  # the first, alone, left at once
    assert len(clf.calls) < 11  # the ten concurrent ones shared calls


def test_one_bad_image_in_a_batch_fails_only_its_own_request() -> None:
    def some_bad(requests: list[ClassifyRequest]) -> list[Any]:
        return [InvalidImageError("not an image") if r.image == "YmFk" else classified(r) for r in requests]

    models = clients(clf=classifier(classify_many=some_bad))

    async def both() -> list[Any]:
        return await asyncio.gather(
            models.classify(ClassifyRequest(image="YmFk"), admission()),
            models.classify(ClassifyRequest(image="aGk="), admission()),
            return_exceptions=True,
        )

    bad, good = asyncio.run(both())
    assert isinstance(bad, InvalidImageError) and isinstance(good, ClassifyResponse)


def test_unknown_and_wrong_kind_models_are_answered_before_any_model_call() -> None:
    t2i, clf = text_to_image(), classifier()
    models = clients(t2i, clf)
    with pytest.raises(ModelNotFoundError):
        asyncio.run(models.generate(infer_request("no-such-model"), admission()))
    with pytest.raises(WrongModelKindError):
        asyncio.run(models.classify(ClassifyRequest(image="aGk=", model_id=MODEL), admission()))
    assert t2i.calls == [] and clf.calls == []


def test_configured_handles_are_made_once_per_model() -> None:
    t2i = text_to_image()
    models = clients(t2i)

    async def run() -> None:
        for model_id in ("m1", "m2", "m1", "m1", "m2"):
            await models.generate(infer_request(model_id), admission())

    loader = FakeLoader([model_info("m1", "text-to-image"), model_info("m2", "text-to-image")])
    models = clients(t2i, loader=loader)
    asyncio.run(run())
    assert t2i.options_calls == ["m1", "m2"]
    assert [model_id for _, model_id, _ in t2i.calls] == ["m1", "m2", "m1", "m1", "m2"]


def test_a_slow_model_is_504_and_its_call_is_cancelled() -> None:
    t2i = FakeHandle({"generate": generated}, delay_s=5.0)
    used = admission()
    with pytest.raises(GatewayTimeoutError, match=r"within 0\.05s"):
        asyncio.run(clients(t2i, timeout_s=0.05).generate(infer_request(), used))
    assert t2i.responses[0].cancelled
    assert used.model_id == MODEL  # the usage record names the model asked for


@pytest.mark.parametrize(
    "failure", [RayActorError(), BackPressureError(num_queued_requests=5, max_queued_requests=5)]
)
def test_a_dead_or_overloaded_deployment_is_503(failure: BaseException) -> None:
    t2i = text_to_image(generate=raising(failure))
    with pytest.raises(ServiceUnavailableError, match="busy or restarting"):
        asyncio.run(clients(t2i).generate(infer_request(), admission()))


def test_an_error_the_model_raised_reaches_the_caller_as_itself() -> None:
    wrapped = RayTaskError("generate", "traceback", ModelNotFoundError("no model 'x'"))
    t2i = text_to_image(generate=raising(wrapped))
    with pytest.raises(ModelNotFoundError, match="no model 'x'"):
        asyncio.run(clients(t2i).generate(infer_request(), admission()))


# --- health ---------------------------------------------------------------------------------------


def test_a_degraded_dependency_shows_in_health_but_keeps_it_ready() -> None:
    # e.g. the rate limiter not answering: limits are a per-replica share (deployments/rate_limiter.py)
    health = asyncio.run(clients(degraded=lambda: ["RateLimiter: not answering"]).health())
    assert (health.status, health.ready) == ("degraded", True)
    assert health.errors == ["RateLimiter: not answering"]


def test_health_is_ok_when_every_part_answers() -> None:
    health = asyncio.run(clients().health())
    assert (health.status, health.ready, health.device, health.models) == ("ok", True, "cpu", 2)
    assert [d.deployment for d in health.deployments] == ["TextToImage", "ImageClassifier"]
    assert health.errors == []


def test_health_names_each_part_that_fails_and_a_model_error_only_degrades() -> None:
    slow = FakeHandle({"health": healthy("TextToImage")}, delay_s=5.0)
    broken = classifier(health=raising(RayTaskError("health", "tb", RuntimeError("boom"))))
    health = asyncio.run(clients(slow, broken, FakeLoader(errors={"tiny": "cannot fetch"}),
                                 health_timeout_s=0.05).health())
    assert (health.status, health.ready, health.device) == ("degraded", False, "unknown")
    assert health.errors == [
        "TextToImage: TimeoutError", "ImageClassifier: RuntimeError", "model tiny: cannot fetch"
    ]
    assert slow.responses[0].cancelled

    only_model_errors = asyncio.run(clients(loader=FakeLoader(errors={"tiny": "cannot fetch"})).health())
    assert (only_model_errors.status, only_model_errors.ready) == ("degraded", True)


def test_health_reports_a_loader_that_does_not_answer() -> None:
    loader = FakeLoader()
    loader.fail = RayActorError()
    health = asyncio.run(clients(loader=loader).health())
    assert health.ready is False and health.models == 0
    assert health.errors == ["ModelLoader: RayActorError"]


# --- the handle helpers ---------------------------------------------------------------------------


def test_multiplexed_handles_are_bounded_and_keep_the_recently_used() -> None:
    base = text_to_image()
    handles = MultiplexedHandles(base, max_entries=2)  # type: ignore[arg-type]
    first = handles.for_model("m1")
    handles.for_model("m2")
    assert handles.for_model("m1") is first  # reused, and now the most recently used
    handles.for_model("m3")  # evicts m2, the least recently used
    assert len(handles) == 2
    assert handles.for_model("m1") is first
    handles.for_model("m2")  # made again
    assert base.options_calls == ["m1", "m2", "m3", "m2"]
    assert handles.base is base
    with pytest.raises(ValueError, match="at least 1"):
        MultiplexedHandles(base, max_entries=0)  # type: ignore[arg-type]


def test_result_within_returns_the_result_or_cancels_on_timeout() -> None:
    assert asyncio.run(result_within(FakeResponse(lambda: 42), 1.0)) == 42  # type: ignore[arg-type]
    slow = FakeResponse(lambda: 42, delay_s=5.0)
    with pytest.raises(TimeoutError):
        asyncio.run(result_within(slow, 0.05))  # type: ignore[arg-type]
    assert slow.cancelled
