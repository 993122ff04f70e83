"""TextToImage: Stable Diffusion replicas, multiplexed by model id.

Callable over HTTP through the ingress, or directly from another Ray application:
``handle.options(multiplexed_model_id=req.model_id).generate.remote(req)`` (the option only
improves routing to a replica that already holds the model; ``req.model_id`` decides).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from deployments.model_replica import ModelReplica
from lib.models.catalog import require_kind
from lib.models.text_to_image import generate, load_pipeline, resolve_params
from lib.schemas import InferRequest, InferResponse, ModelInfo

MODELS_PER_REPLICA = 2


@dataclass
class LoadedPipeline:
    info: ModelInfo
    pipe: Any
    # diffusers pipelines keep per-call state in the scheduler: one generation at a time each.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@serve.deployment
class TextToImage(ModelReplica):
    deployment_name = "TextToImage"

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> LoadedPipeline:
        info = require_kind(await self._loader.ensure(model_id), "text-to-image")
        assert info.path is not None
        pipe = await asyncio.to_thread(load_pipeline, Path(info.path), self._device)
        loaded = LoadedPipeline(info, pipe)
        self._loaded[model_id] = loaded
        return loaded

    async def generate(self, request: InferRequest) -> InferResponse:
        model = await self.get_model(request.model_id)
        params = resolve_params(
            request,
            default_steps=self._settings.default_inference_steps,
            default_guidance_scale=self._settings.default_guidance_scale,
        )
        async with model.lock:
            return await asyncio.to_thread(generate, model.pipe, params, self._device)
