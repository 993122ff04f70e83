"""The HTTP ingress: FastAPI routes that parse HTTP and call one thing each.

Authentication, validation and error mapping are in ``lib/``; the model work is in the model
deployments, reached through handles. Routes are served under ``/v1`` (and ``/infer``,
``/health`` unversioned for clients of the earlier service).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from deployments.model_loader import NodeLoader
from deployments.ray_errors import unwrap
from lib.auth import Authenticator, Principal, require_scope
from lib.errors import GatewayTimeoutError, ServiceUnavailableError
from lib.http_errors import RequestContextMiddleware, install_error_handlers
from lib.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    DeploymentHealth,
    ErrorBody,
    Health,
    InferRequest,
    InferResponse,
    ModelInfo,
    ModelList,
)
from lib.settings import AppSettings, Secrets
from lib.tokens import TokenService

log = logging.getLogger("ray.serve")
T = TypeVar("T")
HEALTH_TIMEOUT_S = 5.0

try:
    VERSION = version("sealserve")
except PackageNotFoundError:  # running from a source tree without installing
    VERSION = "0.0.0"

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 413, 415, 422, 429, 503, 504)
}


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=200)
@serve.ingress()
class Ingress:
    def __init__(
        self,
        text_to_image: DeploymentHandle,
        classifier: DeploymentHandle,
        *,
        settings: AppSettings,
    ) -> None:
        self.settings = settings
        self.text_to_image = text_to_image
        self.classifier = classifier
        secrets = Secrets.from_env(settings)
        self.authenticator = Authenticator(
            tokens=TokenService(
                secrets.secret_key.get_secret_value(),
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
            ),
            bootstrap_keys=[k.get_secret_value() for k in secrets.api_keys],
        )
        self.loader = NodeLoader(settings, serve.get_replica_context().app_name)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self)

    def authorize(self, request: Request, scope: str) -> Principal:
        principal = self.authenticator.authenticate(request.headers.get("authorization"))
        require_scope(principal, scope)
        request.state.principal = principal
        return principal

    async def call_model(self, response: Any) -> Any:
        """Await a model deployment within the request timeout, with our errors unwrapped."""
        try:
            return await asyncio.wait_for(_awaitable(response), self.settings.request_timeout_s)
        except TimeoutError:
            response.cancel()
            raise GatewayTimeoutError(
                f"the model did not answer within {self.settings.request_timeout_s:g}s"
            ) from None
        except (RayActorError, BackPressureError):
            raise ServiceUnavailableError("the model deployment is busy or restarting; retry") from None
        except Exception as exc:
            raise unwrap(exc) from None

    async def health(self) -> Health:
        errors: list[str] = []
        deployments: list[DeploymentHealth] = []
        for name, handle in (("TextToImage", self.text_to_image), ("ImageClassifier", self.classifier)):
            try:
                deployments.append(await _within(handle.health.remote(), HEALTH_TIMEOUT_S))
            except Exception as exc:
                errors.append(f"{name}: {type(unwrap(exc)).__name__}")
        try:
            models = len(await _within(self.loader.models(), HEALTH_TIMEOUT_S))
            model_errors: dict[str, str] = await _within(self.loader.call("errors"), HEALTH_TIMEOUT_S)
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


def _awaitable(response: DeploymentResponse[Any]) -> Awaitable[Any]:
    async def wait() -> Any:
        return await response

    return wait()


async def _within(awaitable: Awaitable[T], timeout: float) -> T:
    return await asyncio.wait_for(awaitable, timeout)


def create_api(ingress: Ingress) -> FastAPI:
    """The FastAPI app of one ingress replica; routes close over ``ingress``."""
    settings = ingress.settings
    api = FastAPI(
        title="sealserve",
        version=VERSION,
        description="Text-to-image and image classification behind one authenticated API.",
        responses=ERROR_RESPONSES,
    )
    api.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        expose_headers=["X-Request-ID", "Retry-After"],
    )
    api.add_middleware(
        RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, proxy_sets_request_id=True
    )
    install_error_handlers(api, log)

    def scope(name: str) -> Callable[[Request], Principal]:
        def dependency(request: Request) -> Principal:
            return ingress.authorize(request, name)

        return dependency

    def info() -> dict[str, Any]:
        return {
            "name": "sealserve",
            "version": VERSION,
            "api_version": "v1",
            "links": {
                "health": "/v1/health",
                "models": "/v1/models",
                "infer": "/v1/infer",
                "classify": "/v1/classify",
                "docs": "/docs",
                "openapi": "/openapi.json",
            },
        }

    api.get("/", summary="Service info and links")(info)
    api.get("/v1", summary="Service info and links (v1)")(info)

    @api.get("/health", response_model=Health, summary="Liveness and readiness (no auth)")
    @api.get("/v1/health", response_model=Health, summary="Liveness and readiness (no auth)")
    async def health() -> Health:
        return await ingress.health()

    @api.get("/v1/models", response_model=ModelList, dependencies=[Depends(scope("infer"))])
    async def list_models() -> ModelList:
        models = await ingress.loader.models()
        return ModelList(models=models, count=len(models))

    @api.get("/v1/models/{model_id}", response_model=ModelInfo, dependencies=[Depends(scope("infer"))])
    async def get_model(model_id: str) -> ModelInfo:
        info: ModelInfo = await ingress.loader.call("get", model_id)
        return info

    @api.post("/v1/infer", response_model=InferResponse, dependencies=[Depends(scope("infer"))])
    @api.post("/infer", response_model=InferResponse, dependencies=[Depends(scope("infer"))])
    async def infer(body: InferRequest) -> InferResponse:
        handle = ingress.text_to_image.options(multiplexed_model_id=body.model_id)
        result: InferResponse = await ingress.call_model(handle.generate.remote(body))
        return result

    @api.post(
        "/v1/classify", response_model=ClassifyResponse, dependencies=[Depends(scope("classify"))]
    )
    async def classify(body: ClassifyRequest) -> ClassifyResponse:
        handle = ingress.classifier
        if body.model_id:
            handle = handle.options(multiplexed_model_id=body.model_id)
        result: ClassifyResponse = await ingress.call_model(handle.classify.remote(body))
        return result

    return api
