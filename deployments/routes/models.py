"""The catalog, from the node's loader: ``GET /v1/models`` and ``/v1/models/{model_id}`` (``infer`` scope)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from deployments.routes.deps import Loader, admit_infer
from lib.schemas import ModelInfo, ModelList

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(admit_infer)])
async def list_models(loader: Loader) -> ModelList:
    models = await loader.models()
    return ModelList(models=models, count=len(models))


@router.get("/v1/models/{model_id}", response_model=ModelInfo, dependencies=[Depends(admit_infer)])
async def get_model(model_id: str, loader: Loader) -> ModelInfo:
    info: ModelInfo = await loader.call("get", model_id)
    return info
