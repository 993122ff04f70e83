"""The HTTP ingress: the deployment that holds the handles and collaborators, and its FastAPI app.

The routes are in ``deployments/routes/`` (one router per concern) and reach what they call
through ``app.state``; authentication, rate limiting, validation and error mapping are in
``lib/``; the model work is in the model deployments, reached through
:class:`deployments.model_clients.ModelClients`; rate-limit counters are in the application's one
``RateLimiter`` deployment.

Each replica has its own account collaborators (``lib/accounts/wiring.py``): an ``AccountStore``
(a connection pool), key caches and a ``UsageRecorder``. Usage is appended to the node's usage
journal before the response is sent (it survives a killed replica: ``lib/accounts/journal.py``),
queued in memory and written in batches by the recorder's thread; when Serve stops the replica
gracefully it calls ``__del__`` (after draining requests, within ``graceful_shutdown_timeout_s``),
which drains the queue into the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp

from deployments.model_clients import ModelClients
from deployments.model_loader import NodeLoader
from deployments.observability import install as install_observability
from deployments.rate_limiter import RateLimiterClient
from deployments.routes.accounts import router as account_routes
from deployments.routes.deps import STATE_ACCOUNTS, STATE_GATE, STATE_LOADER, STATE_MODELS
from deployments.routes.health import router as health_routes
from deployments.routes.inference import router as inference_routes
from deployments.routes.models import router as model_routes
from deployments.routes.openai import OPENAI_PATH_PREFIX, openai_error_response
from deployments.routes.openai import router as openai_routes
from deployments.routes.playground import router as playground_routes
from deployments.version import VERSION
from lib.accounts.gate import RATE_LIMIT_HEADERS
from lib.accounts.records import UsageRecord
from lib.accounts.wiring import AccountsWiring, build_accounts
from lib.errors import SealserveError
from lib.http.asgi import AsgiScope
from lib.http.context import RequestContextMiddleware
from lib.http.errors import install_error_handlers, sealserve_error_response
from lib.http.gate import BodyGateMiddleware, GateMiddleware, body_limit_for
from lib.schemas import ErrorBody
from lib.settings import AppSettings, Secrets, accounts_database_url

log = logging.getLogger("ray.serve")
# The usage drain gets most of the replica's graceful_shutdown_timeout_s (30 s, set in
# deployments/app.py), leaving room for the drain of in-flight requests before it.
USAGE_DRAIN_TIMEOUT_S = 20.0
USAGE_JOURNAL_DIR = "usage-journal"
# A concurrency slot the ingress never gave back (it died) frees itself this long after the
# longest a request can wait for its model.
SLOT_TTL_MARGIN_S = 60.0

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 413, 415, 422, 429, 503, 504)
}


@serve.deployment
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
        install_observability(settings)
        self.settings = settings
        secrets = Secrets.from_env(settings)
        limiter = RateLimiterClient(rate_limiter)
        self.accounts = build_accounts(
            settings.accounts,
            database_url=accounts_database_url(settings, secrets),
            secret_key=secrets.secret_key.get_secret_value(),
            bootstrap_keys=[k.get_secret_value() for k in secrets.api_keys],
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            limiter=limiter,
            default_inference_steps=settings.default_inference_steps,
            slot_ttl_s=settings.request_timeout_s + SLOT_TTL_MARGIN_S,
            usage_journal_dir=usage_journal_dir(settings),
        )
        self.loader = NodeLoader.for_this_replica(settings)
        self.models = ModelClients(
            text_to_image,
            classifier,
            self.loader,
            timeout_s=settings.request_timeout_s,
            default_classifier=settings.default_classifier,
            degraded=limiter.health_errors,
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.settings, accounts=self.accounts, models=self.models, loader=self.loader)

    async def __del__(self) -> None:
        """Serve's graceful-shutdown hook: write the queued usage, close the pool, leave the loader.

        Serve awaits this once the replica's requests are drained (``ReplicaBase.shutdown`` via
        ``call_destructor``; the ingress wrapper runs the ASGI lifespan shutdown, then this).
        """
        wiring: AccountsWiring | None = getattr(self, "accounts", None)  # __init__ may have failed
        if wiring is not None:
            drain = await asyncio.to_thread(wiring.close, USAGE_DRAIN_TIMEOUT_S)
            log.info(
                "usage recorder closed: %d queued at shutdown, %d written in all, %d unwritten, "
                "%d dropped",
                drain.queued, drain.written, drain.unwritten, drain.dropped,
            )
        loader: NodeLoader | None = getattr(self, "loader", None)
        if loader is not None:
            await loader.close()


def usage_journal_dir(settings: AppSettings) -> Path:
    """The node's usage journal: ``accounts.usage_journal_dir``, else ``state_dir/usage-journal``."""
    configured = settings.accounts.usage_journal_dir
    return Path(configured) if configured else settings.state_path / USAGE_JOURNAL_DIR


class IngressApi(FastAPI):
    """The ingress's FastAPI app, with :class:`GateMiddleware` around its whole middleware stack.

    Starlette sends the last-resort 500 from its ServerErrorMiddleware, outside every middleware
    added with ``add_middleware``. Wrapped around it, the gate middleware decorates that response
    too: the rate-limit headers of every answered request, the 500 included, are added in one
    place (``lib/http/gate.py``), and the request is recorded once.
    """

    def __init__(self, *, record_usage: Callable[[UsageRecord], object], **kwargs: Any) -> None:
        self._record_usage = record_usage  # set first: building the stack reads it
        super().__init__(**kwargs)

    def build_middleware_stack(self) -> ASGIApp:
        return GateMiddleware(super().build_middleware_stack(), record=self._record_usage)


def _refusal(exc: SealserveError, scope: AsgiScope, request_id: str) -> ASGIApp:
    """A request the body gate refuses, answered in the shape its route family's clients parse."""
    if str(scope.get("path", "")).startswith(OPENAI_PATH_PREFIX):
        return openai_error_response(exc, Request(scope))
    return sealserve_error_response(exc, request_id)


def create_api(
    settings: AppSettings, *, accounts: AccountsWiring, models: ModelClients, loader: NodeLoader
) -> FastAPI:
    """The FastAPI app of one ingress replica: middleware, error handlers, routers, collaborators."""
    api = IngressApi(
        record_usage=accounts.usage.record,
        title="sealserve",
        version=VERSION,
        description="Text-to-image and image classification behind one authenticated API.",
        responses=ERROR_RESPONSES,
    )
    # Added first, so innermost: inside the request context (request id, the global body cap).
    api.add_middleware(
        BodyGateMiddleware,
        authenticate=accounts.gate.authenticate,
        body_limit=partial(body_limit_for, image_bytes=settings.max_body_bytes),
        error_answer=_refusal,
    )
    api.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        expose_headers=["X-Request-ID", *RATE_LIMIT_HEADERS],
    )
    api.add_middleware(
        RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, proxy_sets_request_id=True
    )
    install_error_handlers(api, log)
    setattr(api.state, STATE_GATE, accounts.gate)
    setattr(api.state, STATE_ACCOUNTS, accounts.service)
    setattr(api.state, STATE_MODELS, models)
    setattr(api.state, STATE_LOADER, loader)
    for router in (
        health_routes, model_routes, inference_routes, openai_routes, account_routes, playground_routes
    ):
        api.include_router(router)
    return api
