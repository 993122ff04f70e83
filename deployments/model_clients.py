"""The ingress's side of the model deployments and of its node's ModelLoader.

Each model call is bounded by the request timeout (504 when it runs out, and the call is
cancelled), Ray's failures of a replica become 503, and an error the model deployment raised
reaches the client as itself (:func:`deployments.ray_errors.unwrap`). Handles configured for a
model id are made once (:class:`deployments.handles.MultiplexedHandles`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from deployments.handles import MAX_CONFIGURED_HANDLES, MultiplexedHandles, result_within, unary
from deployments.model_loader import NodeLoader
from deployments.ray_errors import unwrap
from deployments.version import VERSION
from lib.accounts.gate import Admission
from lib.errors import GatewayTimeoutError, ServiceUnavailableError
from lib.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    DeploymentHealth,
    Health,
    InferRequest,
    InferResponse,
)

T = TypeVar("T")
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
        health_timeout_s: float = HEALTH_TIMEOUT_S,
        max_configured_handles: int = MAX_CONFIGURED_HANDLES,
    ) -> None:
        self._text_to_image = MultiplexedHandles(text_to_image, max_entries=max_configured_handles)
        self._classifier = MultiplexedHandles(classifier, max_entries=max_configured_handles)
        self._loader = loader
        self._timeout_s = timeout_s
        self._health_timeout_s = health_timeout_s

    async def generate(self, body: InferRequest, admission: Admission) -> InferResponse:
        """Text to image; ``admission`` learns the model and the image count for the usage record."""
        admission.model_id = body.model_id
        handle = self._text_to_image.for_model(body.model_id)
        result: InferResponse = await self._call(unary(handle.generate.remote(body)))
        admission.model_id, admission.image_count = result.model_id, len(result.images)
        return result

    async def classify(self, body: ClassifyRequest, admission: Admission) -> ClassifyResponse:
        admission.model_id = body.model_id
        handle = self._classifier.for_model(body.model_id) if body.model_id else self._classifier.base
        result: ClassifyResponse = await self._call(unary(handle.classify.remote(body)))
        # One image classified; recorded under the model that did it, not the name asked for.
        admission.model_id, admission.image_count = result.model, 1
        return result

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
            raise unwrap(exc) from None

    async def _within(self, awaitable: Awaitable[T]) -> T:
        return await asyncio.wait_for(awaitable, self._health_timeout_s)
