"""The resource API as a FastAPI app: ``create_app(settings)`` (docs/sealed-models.md).

Routes only parse HTTP and call :class:`~lib.resource_api.service.ResourceService`. Every body is
JSON (``application/json``, else 415); bytes are base64 (see :mod:`lib.sealed.wire`).
Errors, request ids and the body limit (413 above ``max_upload_bytes``) are the shared plumbing of
:mod:`lib.http.errors`, so both sealserve apps answer in the same body shape
``{"error": {"code", "message", "request_id"}}``. :class:`~lib.resource_api.guard.ResourceGuard`
checks the bearer token and the route's own body cap before any body is read; a throttled login
is a 429 with ``Retry-After``.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.responses import JSONResponse

from lib.http.context import RequestContextMiddleware
from lib.http.errors import install_error_handlers, request_id_of, sealserve_error_response
from lib.resource_api.guard import ResourceGuard
from lib.resource_api.service import ResourceCaller, ResourceService
from lib.resource_api.settings import ResourceApiSettings
from lib.resource_api.store import ResourceStore
from lib.resource_api.throttle import ThrottledError
from lib.schemas import TokenResponse
from lib.sealed.wire import (
    FINGERPRINT_PATTERN,
    NAME_PATTERN,
    CdnConfig,
    CdnResponse,
    EnrollRequest,
    FetchCountResponse,
    FetchKind,
    GetRequest,
    GetResponse,
    ListResponse,
    LoginRequest,
    NodeInfo,
    NodeKeyRequest,
    NonceResponse,
    UploadRequest,
    UploadResponse,
)

log = logging.getLogger(__name__)

Folder = Annotated[str, Path(pattern=NAME_PATTERN, description="folder name")]
OptionalName = Annotated[str | None, Query(pattern=NAME_PATTERN)]


def _caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> ResourceCaller:
    service: ResourceService = request.app.state.service
    return service.authenticate(authorization)


# Module level: FastAPI resolves the (postponed) annotations of routes against module globals.
Caller = Annotated[ResourceCaller, Depends(_caller)]


def _add_routes(app: FastAPI, service: ResourceService) -> None:
    @app.get("/health")
    def health() -> dict[str, str]:
        return service.health()

    @app.post("/login", response_model=TokenResponse)
    def login(body: LoginRequest, request: Request) -> TokenResponse:
        return service.login(body, request.client.host if request.client else "-")

    @app.post("/nodes/enroll", response_model=NodeInfo)
    def enroll_node(body: EnrollRequest, caller: Caller) -> NodeInfo:
        return service.enroll(caller, body)

    @app.post("/nodes/nonce", response_model=NonceResponse)
    def node_nonce(caller: Caller) -> NonceResponse:
        return service.nonce(caller)

    @app.post("/resources/get/{folder}", response_model=GetResponse)
    def get_resource(folder: Folder, body: GetRequest, caller: Caller) -> GetResponse:
        return service.get(caller, folder, body)

    @app.post("/resources/{folder}", response_model=UploadResponse)
    def upload_resource(folder: Folder, body: UploadRequest, caller: Caller) -> UploadResponse:
        return service.upload(caller, folder, body)

    @app.get("/resources/{folder}", response_model=ListResponse)
    def list_resources(folder: Folder, caller: Caller) -> ListResponse:
        return service.list(caller, folder)

    @app.post("/cdn", response_model=CdnResponse)
    def get_cdn(body: NodeKeyRequest, caller: Caller) -> CdnResponse:
        return service.cdn_config(caller, body)

    @app.put("/cdn")
    def put_cdn(body: CdnConfig, caller: Caller) -> dict[str, str]:
        service.set_cdn_config(caller, body)
        return {"status": "updated"}

    @app.get("/stats/fetches", response_model=FetchCountResponse)
    def fetch_stats(
        caller: Caller,
        folder: OptionalName = None,
        name: OptionalName = None,
        kind: Annotated[FetchKind | None, Query()] = None,
        fingerprint: Annotated[str | None, Query(pattern=FINGERPRINT_PATTERN)] = None,
    ) -> FetchCountResponse:
        return service.fetch_count(caller, folder=folder, name=name, kind=kind, fingerprint=fingerprint)


def create_app(settings: ResourceApiSettings, *, store: ResourceStore | None = None) -> FastAPI:
    """The resource API app; ``store`` defaults to one at ``settings.database_url``."""
    service = ResourceService(settings, store=store)
    development = settings.environment == "development"
    if development:
        log.warning("resource API in development mode: do not hold real model keys with it")
    app = FastAPI(
        title="sealserve resource API",
        description="Small parts, manifests and wrapped data keys of sealed models.",
        # The schema documents every route for an attacker too; serve it in development only.
        docs_url="/docs" if development else None,
        redoc_url=None,
        openapi_url="/openapi.json" if development else None,
    )
    app.state.service = service
    install_error_handlers(app, log)

    async def on_throttled(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ThrottledError)
        response = sealserve_error_response(exc, request_id_of(request))
        response.headers["Retry-After"] = str(exc.retry_after)
        return response

    app.add_exception_handler(ThrottledError, on_throttled)
    _add_routes(app, service)
    # The last added runs first: request id and global cap, then the token and the route's cap.
    app.add_middleware(ResourceGuard, check_token=service.check_token, upload_cap=settings.max_upload_bytes)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_upload_bytes)
    return app


def app_from_env(**overrides: Any) -> FastAPI:
    """``create_app(ResourceApiSettings.from_env(**overrides))``, for the CLI and Serve."""
    return create_app(ResourceApiSettings.from_env(**overrides))
