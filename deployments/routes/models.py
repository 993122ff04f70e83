"""The catalog, from the node's loader: ``GET /v1/models`` and ``/v1/models/{model_id}`` (``infer`` scope).

``GET /v1/models`` carries OpenAI's list shape (``object``, ``data``) beside ``models`` and
``count``, so the ``openai`` client's ``models.list()`` works on it.

Where a model lies on a node (``path``) is for the model replicas, never for a key holder: it is
always null over HTTP.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from deployments.routes.deps import Loader, admit_infer
from lib.schemas import ModelInfo, ModelList

router = APIRouter()


def _public(info: ModelInfo) -> ModelInfo:
    return info.model_copy(update={"path": None})


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(admit_infer)])
async def list_models(loader: Loader) -> ModelList:
    return ModelList.of([_public(info) for info in await loader.models()])


@router.get("/v1/models/{model_id}", response_model=ModelInfo, dependencies=[Depends(admit_infer)])
async def get_model(model_id: str, loader: Loader) -> ModelInfo:
    info: ModelInfo = await loader.call("get", model_id)
    return _public(info)
