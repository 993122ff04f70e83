"""The resource API as a Ray Serve application.

    serve run deployments.resource_api:build_resource_api        (or a config with this import_path)

Its args are the non-secret fields of ``ResourceApiSettings`` (``environment``, ``database_url``,
``token_ttl_seconds``, ...); the secrets (``RESOURCE_MASTER_KEY``, ``RESOURCE_JWT_SECRET``) come
from the replicas' environment, as for the standalone ``sealserve resource-api serve``. Use a
shared database (PostgreSQL) when running more than one replica.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from lib.resource_api.app import app_from_env
from lib.resource_api.settings import ResourceApiSettings


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress()
class ResourceApi:
    def __init__(self, args: dict[str, Any]) -> None:
        self._args = args

    def __serve_build_asgi_app__(self) -> FastAPI:
        return app_from_env(**self._args)


def build_resource_api(args: dict[str, Any]) -> Application:
    """Validate the args (and the environment's secrets) at deploy time, then bind."""
    ResourceApiSettings.from_env(**args)
    return ResourceApi.bind(dict(args))  # type: ignore[attr-defined]
