"""Service info and health: ``GET /``, ``/v1``, ``/health``, ``/v1/health`` (no auth)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from deployments.routes.deps import Models
from deployments.version import VERSION
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


@router.get("/health", response_model=Health, summary="Liveness and readiness (no auth)")
@router.get("/v1/health", response_model=Health, summary="Liveness and readiness (no auth)")
async def health(models: Models) -> Health:
    return await models.health()
