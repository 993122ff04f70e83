"""The HTTP ingress: FastAPI routes that parse HTTP and call one thing each.

Authentication, rate limiting, validation and error mapping are in ``lib/``; the model work is in
the model deployments, reached through handles; rate-limit counters are in the application's one
``RateLimiter`` deployment. Routes are served under ``/v1`` (and ``/infer``, ``/health``
unversioned for clients of the earlier service); the account routes are in
``deployments/account_routes.py``.

Each replica has its own ``AccountStore`` (a connection pool), key caches and ``UsageRecorder``.
Usage is queued in memory and written in batches by the recorder's thread; when Serve stops the
replica gracefully it calls ``__del__`` (after draining requests, within
``graceful_shutdown_timeout_s``), which drains the queue into the database.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from deployments.account_routes import add_account_routes
from deployments.model_loader import NodeLoader
from deployments.rate_limiter import RateLimiterClient
from deployments.ray_errors import unwrap
from lib.accounts.auth import Authenticator
from lib.accounts.gate import RATE_LIMIT_HEADERS, Admission, RequestGate
from lib.accounts.key_cache import KeyCache
from lib.accounts.records import KeyRecord, Scope
from lib.accounts.service import AccountService
from lib.accounts.store import AccountStore
from lib.accounts.usage import UsageRecorder
from lib.errors import GatewayTimeoutError, ServiceUnavailableError
from lib.http.context import RequestContextMiddleware
from lib.http.errors import install_error_handlers
from lib.http.gate import GateMiddleware, admission_of, attach_admission
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
from lib.settings import AppSettings, Secrets, accounts_database_url
from lib.tokens import TokenService
from lib.ttl_cache import TtlCache

log = logging.getLogger("ray.serve")
T = TypeVar("T")
HEALTH_TIMEOUT_S = 5.0
# Serve stops a replica within graceful_shutdown_timeout_s (draining requests, then __del__);
# the usage drain gets most of it, leaving room for the drain of in-flight requests.
GRACEFUL_SHUTDOWN_TIMEOUT_S = 30.0
USAGE_DRAIN_TIMEOUT_S = 20.0

try:
    VERSION = version("sealserve")
except PackageNotFoundError:  # running from a source tree without installing
    VERSION = "0.0.0"

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 413, 415, 422, 429, 503, 504)
}


def _database_unavailable(exc: BaseException) -> bool:
    # Worth retrying a usage batch: the database is down or unreachable (AccountStore says so with
    # a 503). Anything else (a bug, a constraint) would fail the same way forever.
    return isinstance(exc, ServiceUnavailableError)


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=200,
    graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
)
@serve.ingress()
class Ingress:
    def __init__(
        self,
        text_to_image: DeploymentHandle,
        classifier: DeploymentHandle,
        *,
        settings: AppSettings,
        rate_limiter: DeploymentHandle,
    ) -> None:
        self.settings = settings
        self.text_to_image = text_to_image
        self.classifier = classifier
        secrets = Secrets.from_env(settings)
        accounts = settings.accounts
        self.store = AccountStore(accounts_database_url(settings, secrets))
        tokens = TokenService(
            secrets.secret_key.get_secret_value(),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            ttl_s=accounts.token_ttl_s,
        )
        keys = KeyCache(
            self.store.lookup_key_hash,
            ttl_s=accounts.key_cache_ttl_s,
            negative_ttl_s=accounts.key_cache_negative_ttl_s,
            max_entries=accounts.key_cache_max_entries,
        )
        # Tokens name their key by id: looked up (and cached) to apply its limit and revocation.
        self.key_ids: TtlCache[str, KeyRecord] = TtlCache(
            self.store.get_key,
            ttl_s=accounts.key_cache_ttl_s,
            negative_ttl_s=accounts.key_cache_negative_ttl_s,
            max_entries=accounts.key_cache_max_entries,
        )
        self.gate = RequestGate(
            authenticator=Authenticator(
                tokens=tokens,
                bootstrap_keys=[k.get_secret_value() for k in secrets.api_keys],
                lookup_key=keys.get,
                lookup_key_id=self.key_ids.get,
                bootstrap_rate_limit=accounts.bootstrap_rate_limit_spec,
            ),
            limiter=RateLimiterClient(rate_limiter),
        )
        self.accounts = AccountService(self.store, tokens, on_revoked=self.key_ids.invalidate)
        self.usage = UsageRecorder(
            self.store.record_usage,
            max_batch=accounts.usage_batch_size,
            flush_interval_s=accounts.usage_flush_interval_s,
            max_queue=accounts.usage_max_queue,
            retry_on=_database_unavailable,
        )
        self.loader = NodeLoader.for_this_replica(settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self)

    async def __del__(self) -> None:
        """Serve's graceful-shutdown hook: write the queued usage, close the pool, leave the loader.

        Serve awaits this once the replica's requests are drained (``ReplicaBase.shutdown`` via
        ``call_destructor``; the ingress wrapper runs the ASGI lifespan shutdown, then this).
        """
        usage: UsageRecorder | None = getattr(self, "usage", None)  # __init__ may have failed
        if usage is not None:
            queued = usage.pending
            left = await asyncio.to_thread(usage.close, USAGE_DRAIN_TIMEOUT_S)
            log.info(
                "usage recorder closed: %d queued at shutdown, %d written in all, %d unwritten, "
                "%d dropped",
                queued, usage.written, left, usage.dropped,
            )
        store: AccountStore | None = getattr(self, "store", None)
        if store is not None:
            store.close()
        loader: NodeLoader | None = getattr(self, "loader", None)
        if loader is not None:
            await loader.close()

    async def admit(self, request: Request, scope: Scope | None) -> Admission:
        """Authenticate and rate-limit the request, then enforce the limit and the scope.

        The admission is attached to the request first, so the 429 or 403 carries the
        rate-limit headers and is recorded as usage like any other answered request.
        """
        admission = await self.gate.admit(request.headers.get("authorization"))
        attach_admission(request.scope, admission)
        admission.require(scope)
        return admission

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

    async def generate(self, body: InferRequest, admission: Admission) -> InferResponse:
        admission.model_id = body.model_id
        handle = self.text_to_image.options(multiplexed_model_id=body.model_id)
        result: InferResponse = await self.call_model(handle.generate.remote(body))
        admission.model_id, admission.image_count = result.model_id, len(result.images)
        return result

    async def classify(self, body: ClassifyRequest, admission: Admission) -> ClassifyResponse:
        admission.model_id = body.model_id
        handle = self.classifier
        if body.model_id:
            handle = handle.options(multiplexed_model_id=body.model_id)
        result: ClassifyResponse = await self.call_model(handle.classify.remote(body))
        # One image classified; recorded under the model that did it, not the name asked for.
        admission.model_id, admission.image_count = result.model, 1
        return result

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
    api.add_middleware(GateMiddleware, record=ingress.usage.record)
    api.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        expose_headers=["X-Request-ID", *RATE_LIMIT_HEADERS],
    )
    api.add_middleware(
        RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, proxy_sets_request_id=True
    )
    install_error_handlers(api, log)
    _rate_headers_on_unexpected_errors(api)

    def scope(name: Scope | None) -> Callable[[Request], Awaitable[Admission]]:
        async def dependency(request: Request) -> Admission:
            return await ingress.admit(request, name)

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
                "token": "/v1/auth/token",
                "usage": "/v1/usage",
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

    @api.get("/v1/models", response_model=ModelList, dependencies=[Depends(scope(Scope.INFER))])
    async def list_models() -> ModelList:
        models = await ingress.loader.models()
        return ModelList(models=models, count=len(models))

    @api.get(
        "/v1/models/{model_id}", response_model=ModelInfo, dependencies=[Depends(scope(Scope.INFER))]
    )
    async def get_model(model_id: str) -> ModelInfo:
        info: ModelInfo = await ingress.loader.call("get", model_id)
        return info

    @api.post("/v1/infer", response_model=InferResponse)
    @api.post("/infer", response_model=InferResponse)
    async def infer(body: InferRequest, admission: Admission = Depends(scope(Scope.INFER))) -> InferResponse:
        return await ingress.generate(body, admission)

    @api.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(
        body: ClassifyRequest, admission: Admission = Depends(scope(Scope.CLASSIFY))
    ) -> ClassifyResponse:
        return await ingress.classify(body, admission)

    add_account_routes(api, ingress.accounts, scope)
    return api


def _rate_headers_on_unexpected_errors(api: FastAPI) -> None:
    """The last-resort 500 is sent from outside every middleware (Starlette's ServerErrorMiddleware),
    so GateMiddleware cannot decorate it: its handler adds the rate-limit headers itself."""
    generic = api.exception_handlers[Exception]

    async def on_unexpected_error(request: Request, exc: Exception) -> Response:
        answer = generic(request, exc)
        response = await answer if inspect.isawaitable(answer) else answer
        admission = admission_of(request.scope)
        if admission is not None:
            response.headers.update(admission.headers())
        return response

    api.add_exception_handler(Exception, on_unexpected_error)
