"""Service info and health: ``GET /``, ``/v1``, ``/health``, ``/v1/health``.

Health needs no credential for status and readiness (load balancers, probes); its details
(deployments, devices, upstream errors with hostnames and account names) need an admin one.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from deployments.routes.deps import Models, admit
from deployments.version import VERSION
from lib.accounts.records import Scope
from lib.schemas import Health

router = APIRouter()


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
            "images": "/v1/images/generations",
            "playground": "/playground",
        },
    }


router.get("/", summary="Service info and links")(info)
router.get("/v1", summary="Service info and links (v1)")(info)


_SUMMARY = "Liveness and readiness; details with an admin credential"


@router.get("/health", response_model=Health, response_model_exclude_none=True, summary=_SUMMARY)
@router.get("/v1/health", response_model=Health, response_model_exclude_none=True, summary=_SUMMARY)
async def health(request: Request, models: Models) -> Health:
    if request.headers.get("authorization") is None:
        return (await models.health()).public()
    await admit(request, Scope.ADMIN)  # a credential that is given must be valid and admin
    return await models.health()
