"""The ingress's side of the model deployments and of its node's ModelLoader.

Each model call is bounded by the request timeout (504 when it runs out, and the call is
cancelled), Ray's failures of a replica become 503, and an error the model deployment raised
reaches the client as itself (:func:`deployments.ray_errors.unwrap`). Handles configured for a
model id are made once (:class:`deployments.handles.MultiplexedHandles`).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from deployments.handles import MAX_CONFIGURED_HANDLES, MultiplexedHandles, result_within, unary
from deployments.model_loader import NodeLoader
from deployments.ray_errors import unwrap
from deployments.version import VERSION
from lib.accounts.gate import Admission
from lib.batching import MicroBatcher
from lib.errors import GatewayTimeoutError, SealserveError, ServiceUnavailableError
from lib.models.catalog_view import CatalogView
from lib.observability import metrics
from lib.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    DeploymentHealth,
    GenerationStep,
    Health,
    InferRequest,
    InferResponse,
    ModelInfo,
)

T = TypeVar("T")
TEXT_TO_IMAGE = "text-to-image"
CLASSIFICATION = "image-classification"
# The most classify requests one handle call carries, and the calls out at once per ingress
# replica (lib/batching.py). Reasoned: 32 covers the bench's 32 clients in one call; two calls out
# keep one batch computing while the next travels (and feed two classifier replicas). Measured
# together with the rest of the request-path changes (bench/request_path.py, 32 clients, 2 cores):
# 188 req/s with one handle call per request, 489 req/s with these; not tuned separately.
CLASSIFY_BATCH = 32
CLASSIFY_IN_FLIGHT = 2
# Each part of /health (a model deployment, the loader) gets this long before it counts as down.
HEALTH_TIMEOUT_S = 5.0


class ModelClients:
    def __init__(
        self,
        text_to_image: DeploymentHandle,
        classifier: DeploymentHandle,
        loader: NodeLoader,
        *,
        timeout_s: float,
        default_classifier: str | None = None,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
        max_configured_handles: int = MAX_CONFIGURED_HANDLES,
        degraded: Callable[[], list[str]] = list,
    ) -> None:
        self._degraded = degraded  # what else degrades the service now (e.g. the rate limiter)
        self._text_to_image = MultiplexedHandles(text_to_image, max_entries=max_configured_handles)
        self._text_to_image_stream = MultiplexedHandles(
            text_to_image.options(stream=True), max_entries=max_configured_handles
        )
        self._classifier = MultiplexedHandles(classifier, max_entries=max_configured_handles)
        self._loader = loader
        self._catalog = CatalogView(loader.models)
        self._default_classifier = default_classifier
        self._timeout_s = timeout_s
        self._health_timeout_s = health_timeout_s
        # Concurrent classify requests of this replica travel to the classifier together: the
        # Ray round trip is paid once per batch, and the classifier runs one forward pass for it.
        self._classify_batches: MicroBatcher[ClassifyRequest, ClassifyResponse | BaseException] = (
            MicroBatcher(self._classify_many, max_batch=CLASSIFY_BATCH, max_in_flight=CLASSIFY_IN_FLIGHT)
        )

    async def generate(self, body: InferRequest, admission: Admission) -> InferResponse:
        """Text to image; ``admission`` learns the model and the image count for the usage record."""
        admission.model_id = body.model_id
        info = await self._catalog.resolve(body.model_id, TEXT_TO_IMAGE)
        admission.model_id = info.id
        handle = self._text_to_image.for_model(info.id)
        routed = body.model_copy(update={"model_id": info.id})
        started = time.perf_counter()
        result: InferResponse = await self._call(unary(handle.generate.remote(routed)))
        admission.timings["model"] = (time.perf_counter() - started) * 1000
        admission.image_count = len(result.images)
        metrics.request_cost(admission.principal.subject, admission.cost)
        return result

    async def resolve_text_to_image(self, id_or_name: str | None) -> ModelInfo:
        """The text-to-image model a request names (None: the first one), or 404 / 422."""
        return await self._catalog.resolve(id_or_name, TEXT_TO_IMAGE)

    async def generate_stream(
        self, body: InferRequest, admission: Admission, previews: int = 0
    ) -> AsyncIterator[GenerationStep | InferResponse]:
        """Text to image with progress: the replica's steps as they happen, then the response.

        The model is resolved before the first item (an unknown model raises here, before any
        response is started). The whole stream is bounded by the request timeout (504); leaving
        the iteration early (the client hung up) cancels the generation.
        """
        admission.model_id = body.model_id
        info = await self._catalog.resolve(body.model_id, TEXT_TO_IMAGE)
        admission.model_id = info.id
        handle = self._text_to_image_stream.for_model(info.id)
        routed = body.model_copy(update={"model_id": info.id})
        return self._stream(handle.generate_stream.remote(routed, previews), admission)

    async def _stream(
        self, response: Any, admission: Admission
    ) -> AsyncIterator[GenerationStep | InferResponse]:
        generator: DeploymentResponseGenerator[Any] = response
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        deadline = loop.time() + self._timeout_s
        finished = False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(anext(generator), max(deadline - loop.time(), 0.001))
                except StopAsyncIteration:
                    finished = True
                    return
                except TimeoutError:
                    raise GatewayTimeoutError(
                        f"the model did not finish within {self._timeout_s:g}s"
                    ) from None
                except (RayActorError, BackPressureError):
                    raise ServiceUnavailableError(
                        "the model deployment is busy or restarting; retry"
                    ) from None
                except Exception as exc:
                    raise unwrap(exc) from None
                if isinstance(item, InferResponse):
                    admission.timings["model"] = (time.perf_counter() - started) * 1000
                    admission.image_count = len(item.images)
                yield item
        finally:
            if not finished:
                generator.cancel()

    async def classify(self, body: ClassifyRequest, admission: Admission) -> ClassifyResponse:
        """One image classified, in one handle call with the requests that arrive with it."""
        admission.model_id = body.model_id
        info = await self._catalog.resolve(body.model_id or self._default_classifier, CLASSIFICATION)
        # Recorded under the model that does it, not the name asked for.
        admission.model_id = info.id
        started = time.perf_counter()
        outcome = await self._classify_batches.submit(body.model_copy(update={"model_id": info.id}))
        admission.timings["model"] = (time.perf_counter() - started) * 1000
        if isinstance(outcome, BaseException):
            raise outcome
        admission.image_count = 1
        metrics.request_cost(admission.principal.subject, admission.cost)
        return outcome

    async def _classify_many(
        self, bodies: list[ClassifyRequest]
    ) -> list[ClassifyResponse | BaseException]:
        """One batch of the replica's classify requests: one handle call per model in it."""
        outcomes: list[ClassifyResponse | BaseException] = [
            ServiceUnavailableError("not classified") for _ in bodies
        ]
        by_model: dict[str, list[int]] = defaultdict(list)
        for index, body in enumerate(bodies):
            by_model[str(body.model_id)].append(index)

        async def one_model(model_id: str, indices: list[int]) -> None:
            handle = self._classifier.for_model(model_id)
            try:
                results = await self._call(
                    unary(handle.classify_many.remote([bodies[i] for i in indices]))
                )
            except Exception as exc:  # the call failed as a whole: every request in it fails
                results = [exc] * len(indices)
            for index, result in zip(indices, results, strict=True):
                outcomes[index] = result

        await asyncio.gather(*(one_model(m, indices) for m, indices in by_model.items()))
        return outcomes

    async def health(self) -> Health:
        """Each model deployment and the loader, asked in turn (``health_timeout_s`` each)."""
        errors: list[str] = []
        deployments: list[DeploymentHealth] = []
        for name, handles in (("TextToImage", self._text_to_image), ("ImageClassifier", self._classifier)):
            try:
                deployments.append(
                    await result_within(unary(handles.base.health.remote()), self._health_timeout_s)
                )
            except Exception as exc:
                errors.append(f"{name}: {type(unwrap(exc)).__name__}")
        try:
            models = len(await self._within(self._loader.models()))
            model_errors: dict[str, str] = await self._within(self._loader.call("errors"))
        except Exception as exc:
            errors.append(f"ModelLoader: {type(unwrap(exc)).__name__}")
            models, model_errors = 0, {}
        # A model that cannot be fetched degrades the service but does not make it unready:
        # every other model still serves.
        ready = not errors
        errors += [f"model {name}: {message}" for name, message in sorted(model_errors.items())]
        errors += self._degraded()
        return Health(
            status="ok" if not errors else "degraded",
            ready=ready,
            version=VERSION,
            device=deployments[0].device if deployments else "unknown",
            deployments=deployments,
            models=models,
            errors=errors,
        )

    async def _call(self, response: DeploymentResponse[T]) -> T:
        """Await a model deployment within the request timeout, with our errors unwrapped."""
        try:
            return await result_within(response, self._timeout_s)
        except TimeoutError:
            raise GatewayTimeoutError(
                f"the model did not answer within {self._timeout_s:g}s"
            ) from None
        except (RayActorError, BackPressureError):
            raise ServiceUnavailableError("the model deployment is busy or restarting; retry") from None
        except Exception as exc:
            raise as_answer(unwrap(exc)) from None

    async def _within(self, awaitable: Awaitable[T]) -> T:
        return await asyncio.wait_for(awaitable, self._health_timeout_s)


def as_answer(exc: BaseException) -> BaseException:
    """A model deployment's own error as itself; anything else as a 500 whose traceback the model
    replica has already logged (Serve logs it there with the request id): the ingress logs one line."""
    if isinstance(exc, SealserveError) or not isinstance(exc, Exception):
        return exc
    return SealserveError(f"the model deployment failed ({type(exc).__name__})")
